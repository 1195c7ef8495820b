"""Package discovery for xwin (the metadata lives in pyproject.toml).

Every package under xwin/ is found automatically, and the top-level folder kernels/ (with any subpackage
it grows) is installed as xwin.kernels — never as a top-level "kernels", which would clash with a PyPI
package. pyproject.toml cannot express "find packages, and rename this folder", hence this file.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["xwin", "xwin.*"])
packages += ["xwin.kernels"] + ["xwin.kernels." + p for p in find_packages("kernels")]

setup(packages=packages, package_dir={"xwin": "xwin", "xwin.kernels": "kernels"})

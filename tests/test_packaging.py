"""The wheel ships every module: a plain (non-editable) install must not lose a subpackage.

Builds the wheel from this checkout (no network: the running setuptools, no build isolation) and checks
that every Python module under xwin/ and kernels/ (installed as xwin.kernels) and every data file the
package reads at run time (sample data, configs) is inside it.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _files(folder: Path):
    """Tracked files under folder (git), or every file when this is not a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", str(folder)], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, check=True).stdout
        files = [ROOT / n for n in out.split("\0") if n]
        if files:
            return [p for p in files if p.exists()]
    except (OSError, subprocess.SubprocessError):
        pass
    return [p for p in folder.rglob("*") if p.is_file()]


def _expected() -> set:
    want = set()
    for p in _files(ROOT / "xwin"):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
            want.add("xwin/" + p.relative_to(ROOT / "xwin").as_posix())
    for p in _files(ROOT / "kernels"):
        if p.suffix == ".py" and "__pycache__" not in p.parts:
            want.add("xwin/kernels/" + p.relative_to(ROOT / "kernels").as_posix())
    return want


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source checkout")
def test_wheel_ships_every_module_and_data_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), "-q"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = list(tmp_path.glob("xwin-*.whl"))
    assert len(wheels) == 1, wheels
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    want = _expected()
    assert "xwin/reconstruct/__main__.py" in want and "xwin/kernels/api.py" in want
    missing = sorted(want - names)
    assert not missing, f"not in the wheel: {missing}"
    # never a top-level package called "kernels" (it would clash with a PyPI package of that name)
    assert not any(n.startswith("kernels/") for n in names)
    eps = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheels[0]).read(eps[0]).decode()
    for script in ("xwin-reconstruct", "xwin-train", "xwin-evaluate", "xwin-register"):
        assert script in text

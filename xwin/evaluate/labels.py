"""Label files as people have them, and patient-level splits.

Dialects (found automatically, or forced with explicit column flags):

* ``columns`` (CheXpert style): a path column and one column per finding holding 1 / 0 / -1 (uncertain)
  / blank (not mentioned, taken as 0, the CheXpert convention). ``uncertain``: ``ignore`` (the image is
  left out for that finding), ``ones`` or ``zeros``. A plain ``path,label`` file with 0/1 labels is the
  one-finding case of this dialect.
* ``nih`` (ChestX-ray14 style): a ``Finding Labels`` column of ``|``-separated findings, ``No Finding``
  meaning none; every other finding that occurs becomes a binary label.
* ``classes``: a ``path,label`` file with class names: one finding per class (one-vs-rest); with two
  classes of which one is "normal"/"negative"/"no finding", one finding: the other class.

Patients: a patient column (``Patient ID``, ``patient_id``, ``subject_id``, ...), else ``patientNNN`` in the
path (CheXpert), else every image is its own patient (with a warning). Splits are by patient, always:
``split_col`` (train/val/test, with the usual spellings) if given, else a seeded random split of the
patients. No patient is ever in two splits (a given split column that puts one patient in two splits
is refused).
"""

from __future__ import annotations

import csv
import io
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import XwinError

__all__ = ["LabelError", "LabelTable", "read_labels", "patient_split", "SPLITS"]

SPLITS = ("train", "val", "test")
_SPLIT_NAMES = {
    "train": "train", "training": "train", "tr": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val", "tune": "val",
    "test": "test", "testing": "test", "holdout": "test", "te": "test",
}
_PATH_COLS = ("path", "image index", "image_index", "image", "image_path", "imagepath", "filename", "file",
              "file_name", "img", "dicom", "dicom_path", "jpg", "png")
_PATIENT_COLS = ("patient id", "patient_id", "patientid", "patient", "subject_id", "subject", "subject id",
                 "pid")
_NIH_COLS = ("finding labels", "finding_labels", "findings", "labels")
_LABEL_COLS = ("label", "class", "target", "diagnosis", "y")
_META_COLS = {"sex", "gender", "age", "patient age", "patient gender", "frontal/lateral", "ap/pa", "view position",
              "viewposition", "view", "follow-up #", "study", "study_id", "split", "fold", "originalimage[width",
              "height]", "originalimagepixelspacing[x", "y]", "width", "height"}
_NEGATIVE_NAMES = {"normal", "no finding", "negative", "none", "healthy", "no_finding", "nofinding"}
_CODES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": None,
          "true": 1.0, "false": 0.0, "yes": 1.0, "no": 0.0}


class LabelError(XwinError):
    """A label file that cannot be used as given (unknown columns, a split that leaks patients, ...)."""


@dataclass
class LabelTable:
    """Images, their patients, labels ``y`` (N, F) float (NaN: not used for that finding), splits."""

    paths: List[str]
    files: List[Path]
    patients: List[str]
    findings: List[str]
    y: np.ndarray
    split: np.ndarray
    dialect: str
    notes: List[str] = field(default_factory=list)

    def subset(self, keep: Sequence[int]) -> "LabelTable":
        keep = list(keep)
        return LabelTable([self.paths[i] for i in keep], [self.files[i] for i in keep],
                          [self.patients[i] for i in keep], list(self.findings), self.y[keep], self.split[keep],
                          self.dialect, list(self.notes))


def _find(cols: Sequence[str], candidates: Sequence[str]) -> Optional[str]:
    low = {c.strip().lower(): c for c in cols}
    for cand in candidates:
        if cand in low:
            return low[cand]
    return None


def _need(cols: Sequence[str], name: Optional[str], what: str, csv_path) -> Optional[str]:
    if name is None:
        return None
    if name in cols:
        return name
    hit = _find(cols, [name.strip().lower()])
    if hit is None:
        raise LabelError(f"{csv_path}: no {what} column {name!r} (columns: {', '.join(cols)})")
    return hit


def _read_rows(csv_path: Path) -> Tuple[List[str], List[Dict[str, str]]]:
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LabelError(f"label file not found: {csv_path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LabelError(f"cannot read label file {csv_path}: {e}") from None
    if not text.strip():
        raise LabelError(f"label file is empty: {csv_path}")
    try:
        dialect = csv.Sniffer().sniff(text[:8192], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    cols = [c for c in (reader.fieldnames or []) if c is not None]
    if len(cols) < 2:
        raise LabelError(f"{csv_path}: need a path column and at least one label column, got columns {cols}")
    rows = []
    for r in reader:
        if None in r:
            raise LabelError(f"{csv_path}: line {reader.line_num} has more fields than the header")
        if all((v or "").strip() == "" for v in r.values()):
            continue
        rows.append({k: (v or "").strip() for k, v in r.items()})
    if not rows:
        raise LabelError(f"label file has a header but no rows: {csv_path}")
    return cols, rows


def _is_code_column(rows, col) -> bool:
    vals = {r[col].lower() for r in rows}
    return vals <= set(_CODES) and bool(vals - {""})


def _parse_columns(rows, findings, uncertain, csv_path) -> np.ndarray:
    y = np.zeros((len(rows), len(findings)), dtype=np.float64)
    for j, f in enumerate(findings):
        for i, r in enumerate(rows):
            v = r[f].lower()
            if v not in _CODES:
                raise LabelError(f"{csv_path}: finding {f!r} has value {r[f]!r} on data row {i + 1} "
                                 "(expected 1, 0, -1 or blank)")
            code = _CODES[v]
            if code is None:
                code = 0.0  # blank: not mentioned (CheXpert convention)
            if code == -1.0:
                code = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[uncertain]
            y[i, j] = code
    return y


def _split_pipe(v: str) -> List[str]:
    return [s.strip() for s in v.split("|") if s.strip()]


def _resolve(paths: Sequence[str], root: Path) -> Tuple[List[Optional[Path]], List[str]]:
    """Files for the listed paths under ``root``; tries the path as given, with leading folders dropped,
    then by file name anywhere under root (NIH ships images in images_NNN/images/)."""
    out: List[Optional[Path]] = []
    index: Optional[Dict[str, Path]] = None
    missing = []
    for p in paths:
        cand = Path(p)
        hit = None
        if cand.is_absolute() and cand.is_file():
            hit = cand
        else:
            parts = cand.parts
            for k in range(len(parts)):
                q = root.joinpath(*parts[k:])
                if q.is_file():
                    hit = q
                    break
        if hit is None:
            if index is None:
                index = {}
                for dirpath, _, names in os.walk(root):
                    for n in names:
                        index.setdefault(n, Path(dirpath) / n)
            hit = index.get(cand.name)
        if hit is None:
            missing.append(p)
        out.append(hit)
    return out, missing


def patient_split(patients: Sequence[str], seed: int = 0, fractions=(0.6, 0.2, 0.2)) -> np.ndarray:
    """A seeded random train/val/test split of the *patients* (each image goes where its patient goes)."""
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or np.any(fr < 0) or fr.sum() <= 0:
        raise LabelError(f"split fractions must be three non-negative numbers, got {fractions}")
    fr = fr / fr.sum()
    uniq = sorted(set(patients))
    if len(uniq) < 3:
        raise LabelError(f"need at least 3 patients for a train/val/test split, got {len(uniq)}")
    order = np.random.default_rng([int(seed), 0x5B17]).permutation(len(uniq))
    n_tr = max(1, int(round(fr[0] * len(uniq))))
    n_va = max(1, int(round(fr[1] * len(uniq))))
    n_tr = min(n_tr, len(uniq) - 2)
    n_va = min(n_va, len(uniq) - n_tr - 1)
    where = {}
    for rank, k in enumerate(order):
        where[uniq[k]] = "train" if rank < n_tr else ("val" if rank < n_tr + n_va else "test")
    return np.asarray([where[p] for p in patients])


def read_labels(csv_path, images_root, *, path_col: Optional[str] = None, patient_col: Optional[str] = None,
                findings: Optional[Sequence[str]] = None, label_col: Optional[str] = None,
                uncertain: str = "ignore", split_col: Optional[str] = None, seed: int = 0,
                fractions=(0.6, 0.2, 0.2), missing: str = "error") -> LabelTable:
    """Read a label CSV (any dialect above) and resolve its images under ``images_root``.

    ``missing="error"`` (default) refuses a file whose listed images are not all found; ``"skip"`` warns
    (naming the first missing file) and leaves them out.
    """
    if uncertain not in ("ignore", "ones", "zeros"):
        raise LabelError(f"uncertain must be ignore, ones or zeros, got {uncertain!r}")
    if missing not in ("error", "skip"):
        raise LabelError(f"missing must be error or skip, got {missing!r}")
    csv_path, root = Path(csv_path), Path(images_root)
    if not root.is_dir():
        raise LabelError(f"image root is not a folder: {root}")
    cols, rows = _read_rows(csv_path)
    pcol = _need(cols, path_col, "path", csv_path) or _find(cols, _PATH_COLS)
    if pcol is None:
        raise LabelError(f"{csv_path}: no path column found (looked for {', '.join(_PATH_COLS[:6])}, ...); "
                         "name it with --path-col")
    patcol = _need(cols, patient_col, "patient", csv_path) or _find(cols, _PATIENT_COLS)
    scol = _need(cols, split_col, "split", csv_path)
    lcol = _need(cols, label_col, "label", csv_path)
    used = {pcol, patcol, scol}
    notes: List[str] = []

    cand = lcol or _find(cols, _NIH_COLS)
    nih = cand if cand and (cand.strip().lower() in _NIH_COLS[:2] or any("|" in r[cand] for r in rows)) else None
    explicit_cols = bool(findings) and all(_find(cols, [f.strip().lower()]) for f in findings)
    auto_codes = [c for c in cols if c not in used and c.strip().lower() not in _META_COLS and _is_code_column(rows, c)]
    if explicit_cols:
        dialect = "columns"
    elif nih is not None:
        dialect = "nih"
    elif lcol is not None:
        dialect = "columns" if _is_code_column(rows, lcol) else "classes"
    elif auto_codes:
        dialect = "columns"
    elif _find(cols, _LABEL_COLS) is not None:
        lcol, dialect = _find(cols, _LABEL_COLS), "classes"
    else:
        raise LabelError(f"{csv_path}: no finding columns found (columns: {', '.join(cols)}); name them with "
                         "--findings or --label-col")
    if findings and dialect == "columns" and not explicit_cols:
        raise LabelError(f"{csv_path}: no column for finding(s) {list(findings)} (columns: {', '.join(cols)})")

    if dialect == "nih":
        sets = [set(_split_pipe(r[nih])) for r in rows]
        present = sorted({f for s in sets for f in s if f.lower() not in _NEGATIVE_NAMES})
        fnd = list(findings) if findings else present
        y = np.asarray([[1.0 if f in s else 0.0 for f in fnd] for s in sets], dtype=np.float64).reshape(len(rows), len(fnd))
    elif dialect == "classes":
        vals = [r[lcol] for r in rows]
        classes = sorted(set(vals) - {""})
        neg = [c for c in classes if c.lower() in _NEGATIVE_NAMES]
        fnd = list(findings) if findings else [c for c in classes if c not in neg]
        y = np.asarray([[np.nan if v == "" else float(v == f) for f in fnd] for v in vals], dtype=np.float64)
    else:
        if findings:
            fnd = [_need(cols, f, "finding", csv_path) for f in findings]
        else:
            fnd = [lcol] if lcol is not None else auto_codes
        y = _parse_columns(rows, fnd, uncertain, csv_path)
    if not fnd:
        raise LabelError(f"{csv_path}: no finding columns found (columns: {', '.join(cols)}); name them with "
                         "--findings")

    paths = [r[pcol] for r in rows]
    for i, p in enumerate(paths):
        if not p:
            raise LabelError(f"{csv_path}: data row {i + 1} has an empty path")
    files, missing_paths = _resolve(paths, root)
    keep = list(range(len(rows)))
    if missing_paths:
        msg = (f"{len(missing_paths)} of {len(paths)} images listed in {csv_path} are not under {root}, "
               f"e.g. {missing_paths[0]}")
        if missing == "error":
            raise LabelError(msg + " (use --missing skip to leave them out)")
        warnings.warn(msg + ": left out", stacklevel=2)
        notes.append(msg)
        keep = [i for i in keep if files[i] is not None]

    if patcol is not None:
        patients = [r[patcol] or f"row{i}" for i, r in enumerate(rows)]
    else:
        found = [re.search(r"(patient\d+)", p) for p in paths]
        if all(found):
            patients = [m.group(1) for m in found]
        else:
            patients = list(paths)
            msg = f"{csv_path}: no patient column and no patientNNN in the paths: every image is its own patient"
            warnings.warn(msg, stacklevel=2)
            notes.append(msg)

    if scol is not None:
        split = []
        for i, r in enumerate(rows):
            s = _SPLIT_NAMES.get(r[scol].strip().lower())
            if s is None:
                raise LabelError(f"{csv_path}: split column {scol!r} has value {r[scol]!r} on data row {i + 1} "
                                 "(expected train, val or test)")
            split.append(s)
        seen: Dict[str, str] = {}
        for p, s in zip(patients, split):
            if seen.setdefault(p, s) != s:
                raise LabelError(f"{csv_path}: patient {p!r} is in both the {seen[p]} and the {s} split "
                                 f"of column {scol!r}: splits must be by patient")
        split = np.asarray(split)
    else:
        split = patient_split([patients[i] for i in keep], seed=seed, fractions=fractions)
        full = np.empty(len(rows), dtype=split.dtype)
        full[keep] = split
        split = full
    table = LabelTable(paths, files, patients, list(fnd), y, split, dialect, notes)
    return table.subset(keep) if len(keep) < len(rows) else table

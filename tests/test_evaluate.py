"""xwin.evaluate: label-file dialects, patient splits, AUROC, the feature cache, bad input, the CLI."""

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from xwin.errors import XwinError
from xwin.evaluate import LabelError, auroc, bootstrap_ci, main, patient_split, read_labels
from xwin.evaluate.probes import fast_auroc
from xwin.evaluate.features import EncoderSpec, FeatureCache, compute_features, make_extractor

IMG = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random-init tiny checkpoint (ViT-tiny at 16 px, patch 8), plain tensors only (weights-only loadable)."""
    from xwin.model import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(IMG, 8, 1, 192, 12, 3)
    cfg = {"size": "tiny", "img_size": IMG, "patch_size": 8, "in_chans": 1}
    d = tmp_path_factory.mktemp("ckpt")
    p = d / "checkpoint.pt"
    torch.save({"model_config": cfg, "target_encoder": vit.state_dict(),
                "model": {f"encoder.{k}": v for k, v in vit.state_dict().items()}}, p)
    return p


def _png(path: Path, positive: bool, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = rng.uniform(0, 120, (24, 24))
    if positive:
        a[6:18, 6:18] += 120  # a bright square: learnable signal
    Image.fromarray(a.astype(np.uint8)).save(path)


def _write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture()
def chexpert(tmp_path):
    """CheXpert-style: Path + metadata + findings with 1/0/-1/blank; patients in the paths."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        pat = f"patient{i // 2:05d}"
        rel = f"CheXpert-v1.0-small/train/{pat}/study{i % 2 + 1}/view1_frontal.png"
        card = ["1.0", "0.0", "-1.0", ""][i % 4]
        _png(tmp_path / rel, card == "1.0", rng)
        rows.append([rel, "Male", 50 + i, "Frontal", "AP", "1.0" if card != "1.0" else "", card, "0.0" if i % 3 else "1.0"])
    csv_path = _write_csv(tmp_path / "train.csv", ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding",
                                                   "Cardiomegaly", "Edema"], rows)
    return csv_path, tmp_path


def test_chexpert_dialect_and_uncertain(chexpert):
    csv_path, root = chexpert
    t = read_labels(csv_path, root)
    assert t.dialect == "columns"
    assert t.findings == ["No Finding", "Cardiomegaly", "Edema"]  # Sex/Age/view columns are not findings
    assert len(set(t.patients)) == 15 and t.patients[0] == "patient00000"
    card = t.y[:, 1]
    assert list(card[:4][:2]) == [1.0, 0.0] and np.isnan(card[2]) and card[3] == 0.0  # -1 ignored, blank -> 0
    assert all(f.is_file() for f in t.files)
    assert read_labels(csv_path, root, uncertain="ones").y[2, 1] == 1.0
    assert read_labels(csv_path, root, uncertain="zeros").y[2, 1] == 0.0
    t2 = read_labels(csv_path, root, findings=["Edema"])
    assert t2.findings == ["Edema"] and t2.y.shape == (30, 1)


def test_nih_dialect_pipe_separated(tmp_path):
    rng = np.random.default_rng(1)
    labels = ["Effusion|Mass", "No Finding", "Mass", "Effusion", "No Finding", "Atelectasis|Effusion"]
    rows = []
    for i, lab in enumerate(labels):
        name = f"{i:08d}_000.png"
        _png(tmp_path / "images_001" / "images" / name, "Mass" in lab, rng)  # found by file name
        rows.append([name, lab, 0, i // 2, 50, "M", "PA"])
    p = _write_csv(tmp_path / "Data_Entry_2017.csv", ["Image Index", "Finding Labels", "Follow-up #", "Patient ID",
                                                      "Patient Age", "Patient Gender", "View Position"], rows)
    t = read_labels(p, tmp_path)
    assert t.dialect == "nih"
    assert t.findings == ["Atelectasis", "Effusion", "Mass"]
    np.testing.assert_array_equal(t.y[:, 1], [1, 0, 0, 1, 0, 1])
    np.testing.assert_array_equal(t.y[:, 2], [1, 0, 1, 0, 0, 0])
    assert t.patients == ["0", "0", "1", "1", "2", "2"]


def test_plain_path_label(tmp_path):
    rng = np.random.default_rng(2)
    rows01, rows_cls = [], []
    for i in range(6):
        _png(tmp_path / f"im{i}.png", i % 2 == 1, rng)
        rows01.append([f"im{i}.png", i % 2])
        rows_cls.append([f"im{i}.png", "pneumonia" if i % 2 else "normal"])
    t = read_labels(_write_csv(tmp_path / "a.csv", ["path", "label"], rows01), tmp_path)
    assert t.findings == ["label"] and list(t.y[:, 0]) == [0, 1, 0, 1, 0, 1]
    with pytest.warns(UserWarning, match="own patient"):
        t = read_labels(_write_csv(tmp_path / "b.csv", ["filename", "diagnosis"], rows_cls), tmp_path)
    assert t.dialect == "classes" and t.findings == ["pneumonia"] and list(t.y[:, 0]) == [0, 1, 0, 1, 0, 1]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=3, max_size=60), st.integers(0, 1000))
def test_patient_split_never_leaks(pats, seed):
    pats = [f"p{p}" for p in pats]
    if len(set(pats)) < 3:
        with pytest.raises(LabelError):
            patient_split(pats, seed)
        return
    s = patient_split(pats, seed)
    where = {}
    for p, sp in zip(pats, s):
        assert where.setdefault(p, sp) == sp  # one split per patient
    assert set(s) == {"train", "val", "test"}
    np.testing.assert_array_equal(s, patient_split(pats, seed))  # seeded


def test_given_split_column_that_leaks_is_refused(chexpert, tmp_path):
    csv_path, root = chexpert
    rows = list(csv.reader(open(csv_path)))
    rows[0].append("split")
    for i, r in enumerate(rows[1:]):
        r.append(["train", "test", "valid"][i % 3])  # patient00000's two studies land in train and test
    p = _write_csv(tmp_path / "split.csv", rows[0], rows[1:])
    with pytest.raises(LabelError, match="patient00000.*both"):
        read_labels(p, root, split_col="split")
    for i, r in enumerate(rows[1:]):
        r[-1] = ["train", "train", "valid", "valid", "test", "test"][i % 6]  # by patient: fine
    t = read_labels(_write_csv(tmp_path / "split2.csv", rows[0], rows[1:]), root, split_col="split")
    assert set(t.split) == {"train", "val", "test"}


def test_auroc_known_case():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert auroc(y, s) == pytest.approx(0.75)  # 3 of the 4 positive/negative pairs ordered right
    assert np.isnan(auroc(np.ones(4), s))
    # the rank formula used inside the bootstrap equals scikit-learn's value, ties included
    rng = np.random.default_rng(0)
    for _ in range(20):
        yr, sr = rng.integers(0, 2, 40), rng.integers(0, 5, 40).astype(float)
        if len(set(yr)) == 2:
            assert fast_auroc(yr, sr) == pytest.approx(auroc(yr, sr), abs=1e-12)
    ci = bootstrap_ci(lambda i: fast_auroc(y[i], s[i]), np.arange(4), n=300)
    assert ci[0] <= 0.75 <= ci[1]
    yy = np.array([0] * 10 + [1] * 10)
    assert bootstrap_ci(lambda i: fast_auroc(yy[i], yy[i] + 0.0), np.arange(20), n=100) == [1.0, 1.0]


def test_feature_cache(ckpt, tmp_path):
    imgs = np.random.default_rng(0).uniform(0, 1, (5, IMG, IMG)).astype(np.float32)
    spec = EncoderSpec("xwin")
    cache = FeatureCache(tmp_path / "cache", "digest-a", "images-1")
    assert cache.get(spec) is None
    extract, size = make_extractor(spec, ckpt)
    assert size == IMG
    f = compute_features(extract, imgs, batch=2)
    assert f.shape == (5, 192)
    cache.put(spec, f)
    np.testing.assert_array_equal(cache.get(spec), f)
    assert not list((tmp_path / "cache").glob(".tmp-*"))
    # the key covers the checkpoint, the image list and the encoder spec
    assert FeatureCache(tmp_path / "cache", "digest-b", "images-1").get(spec) is None
    assert FeatureCache(tmp_path / "cache", "digest-a", "images-2").get(spec) is None
    assert cache.get(EncoderSpec("random")) is None
    assert cache.get(EncoderSpec("xwin", which="context")) is None
    # random init differs from the checkpoint's weights; the same seed gives the same encoder
    r1 = compute_features(make_extractor(EncoderSpec("random"), ckpt)[0], imgs)
    r2 = compute_features(make_extractor(EncoderSpec("random"), ckpt)[0], imgs)
    np.testing.assert_array_equal(r1, r2)
    assert not np.allclose(r1, f)
    # an intermediate layer gives other features of the same width
    assert not np.allclose(compute_features(make_extractor(EncoderSpec("xwin", layer=5), ckpt)[0], imgs), f)


def _cli(args, capsys):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_labels_end_to_end_and_cache(chexpert, ckpt, tmp_path, capsys):
    csv_path, root = chexpert
    out = tmp_path / "ev"
    args = ["--checkpoint", ckpt, "--labels", csv_path, "--images", root, "--out", out, "--mode", "linear", "fewshot",
            "--shots", "2", "--seeds", "2", "--bootstrap", "50", "--findings", "Cardiomegaly", "Edema",
            "--no-progress", "--split-fractions", "0.5", "0.25", "0.25"]
    rc, so, se = _cli(args, capsys)
    assert rc == 0, se
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["linear"]) == {"xwin", "random", "pixels"}
    for enc in m["linear"].values():
        assert 0.0 <= enc["macro"]["auroc"] <= 1.0
        for f in enc["findings"].values():
            lo, hi = f["ci95"]
            assert lo is None or lo <= hi
    assert m["counts"]["Cardiomegaly"]["train"]["positive"] > 0
    assert set(m["fewshot"]["xwin"]["2"]["findings"]) <= {"Cardiomegaly", "Edema"}
    with open(out / "predictions.csv") as f:
        pred = list(csv.DictReader(f))
    assert pred and {r["split"] for r in pred} == {"test"}
    assert (out / "roc_auroc.png").stat().st_size > 0 and (out / "fewshot.png").is_file()
    assert not list(out.glob(".partial-*"))
    cached = sorted((out / "cache").glob("features-*.npz"))
    assert len(cached) == 3
    mtimes = [p.stat().st_mtime_ns for p in cached]
    rc, so, _ = _cli(args[:8] + ["--mode", "linear", "--no-plot"] + args[15:], capsys)
    assert rc == 0 and so.count("cached") == 3
    assert [p.stat().st_mtime_ns for p in cached] == mtimes


def test_cli_bad_inputs(chexpert, ckpt, tmp_path, capsys):
    csv_path, root = chexpert
    out = tmp_path / "bad"
    base = ["--checkpoint", ckpt, "--images", root, "--out", out, "--bootstrap", "10", "--no-progress", "--no-plot",
            "--encoders", "pixels"]  # input handling does not depend on the encoder
    # a missing image: one line naming it, nothing created
    rows = list(csv.reader(open(csv_path)))
    rows[3][0] = "CheXpert-v1.0-small/train/patient99999/study1/gone.png"
    missing = _write_csv(tmp_path / "missing.csv", rows[0], rows[1:])
    rc, _, err = _cli(base + ["--labels", missing], capsys)
    assert rc == 2 and "gone.png" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()
    # ... or left out with a warning naming it
    rc, _, err = _cli(base + ["--labels", missing, "--missing", "skip", "--findings", "Cardiomegaly"], capsys)
    assert rc == 0 and "gone.png" in err
    # an image that does not decode: a warning naming it, the rest evaluated
    bad = root / rows[5][0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rc, _, err = _cli(base + ["--labels", csv_path, "--findings", "Cardiomegaly", "--out", tmp_path / "b2"], capsys)
    assert rc == 0 and bad.name in err and "warning" in err
    assert json.loads((tmp_path / "b2" / "metrics.json").read_text())["skipped_images"] == [rows[5][0]]
    rc, so, err = _cli(base + ["--labels", csv_path, "--findings", "Cardiomegaly", "--out", tmp_path / "b2"], capsys)
    assert rc == 0 and "cached" in so and bad.name in err  # named again when the features come from the cache
    # a finding with no positives in a split: warned about by name and left out
    for r in rows[1:]:
        r[-1] = "0.0"
    nopos = _write_csv(tmp_path / "nopos.csv", rows[0], [r for i, r in enumerate(rows[1:]) if i not in (2, 4)])
    rc, _, err = _cli(base + ["--labels", nopos, "--findings", "Cardiomegaly", "Edema", "--out", tmp_path / "b3"], capsys)
    assert rc == 0 and "'Edema'" in err and "single class" in err
    m = json.loads((tmp_path / "b3" / "metrics.json").read_text())
    assert "Edema" not in m["linear"]["pixels"]["findings"]
    # only that finding: nothing to evaluate -> error, no half-written folder
    rc, _, err = _cli(base + ["--labels", nopos, "--findings", "Edema", "--out", tmp_path / "b4"], capsys)
    assert rc == 2 and "nothing to evaluate" in err and not (tmp_path / "b4" / "metrics.json").exists()
    assert not list((tmp_path / "b4").glob(".partial-*"))
    # unknown column, empty file, bad checkpoint, bad split value
    rc, _, err = _cli(base + ["--labels", csv_path, "--findings", "Nope"], capsys)
    assert rc == 2 and "Nope" in err
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    rc, _, err = _cli(base + ["--labels", empty], capsys)
    assert rc == 2 and "empty" in err
    rc, _, err = _cli(["--checkpoint", tmp_path / "none.pt", "--labels", csv_path, "--images", root, "--out", out], capsys)
    assert rc == 2 and "none.pt" in err
    rows = list(csv.reader(open(csv_path)))
    rows[0].append("split")
    for r in rows[1:]:
        r.append("later")
    rc, _, err = _cli(base + ["--labels", _write_csv(tmp_path / "s.csv", rows[0], rows[1:]), "--split-col", "split"], capsys)
    assert rc == 2 and "later" in err
    with pytest.raises(XwinError):
        read_labels(csv_path, tmp_path / "no_such_root")


def test_label_error_is_xwin_error():
    assert issubclass(LabelError, XwinError)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert patient_split(["a", "b", "c"], 0).tolist().count("test") == 1


def test_exported_encoder_names_which_it_holds(ckpt, tmp_path, capsys, chexpert):
    from xwin.model import export_encoder

    p = export_encoder(ckpt, tmp_path / "enc.safetensors", which="target")
    csv_path, root = chexpert
    rc, _, err = _cli(["--checkpoint", p, "--which", "context", "--labels", csv_path, "--images", root,
                       "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "holds the target encoder" in err and not (tmp_path / "o").exists()

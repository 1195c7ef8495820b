"""xwin.findings (synthetic patients with inserted findings, anatomy targets) and the --benchmark CLI."""

import json

import numpy as np
import pytest
import torch

from xwin.evaluate import main
from xwin.findings import (ANATOMY_TARGETS, FINDINGS, BenchmarkConfig, anatomy_targets, build_benchmark,
                           insert_findings, make_patient, phantom_structures)

GRID = dict(ct_shape=(32, 32, 32), ct_spacing=(10.0, 10.0, 10.0), render={"size": 16, "method": "siddon"}, img_size=16)


def test_phantom_structures_match_the_phantom():
    hu, m = phantom_structures((32, 32, 32), (10.0, 10.0, 10.0), seed=100_001)
    assert m["lung"].any() and m["heart"].any()
    assert float(hu.data[m["lung"]].median()) < -700  # lung voxels hold lung HU
    assert abs(float(hu.data[m["heart"]].median()) - 40.0) < 30  # heart voxels hold soft-tissue HU
    assert not (m["lung"] & m["heart"]).any()


@pytest.fixture(scope="module")
def patient():
    return make_patient(3, BenchmarkConfig(patients=6, sample_fraction=0.5, **GRID))  # a phantom patient


def test_each_finding_changes_what_it_should(patient):
    base = anatomy_targets(patient)
    rng = np.random.default_rng
    none = insert_findings(patient, {}, rng(0))
    assert torch.equal(none.hu.data, patient.hu.data)
    card = insert_findings(patient, {"cardiomegaly": 1}, rng(0))
    assert anatomy_targets(card)["heart_volume_ml"] > 1.1 * base["heart_volume_ml"]
    eff = insert_findings(patient, {"effusion": 1}, rng(0))
    assert anatomy_targets(eff)["lung_volume_ml"] < 0.99 * base["lung_volume_ml"]  # >= 5 % of one lung
    changed = eff.hu.data != patient.hu.data
    assert (patient.lung | ~changed).all()  # fluid only where lung was
    ptx = insert_findings(patient, {"pneumothorax": 1}, rng(0))
    rim = (ptx.hu.data == -1000.0) & patient.lung
    assert rim.sum() > 0
    nod = insert_findings(patient, {"nodule": 1}, rng(0))
    d = nod.hu.data - patient.hu.data
    assert (d[patient.lung] > 0).sum() > 0 and (d[~patient.lung] == 0).all()


def test_sample_ct_patients_differ_and_targets_vary():
    cfg = BenchmarkConfig(patients=6, sample_fraction=1.0, **GRID)
    a, b = make_patient(0, cfg), make_patient(1, cfg)
    assert a.heart.any() and a.lung.any()
    assert (a.hu.data - b.hu.data).abs().mean() > 5.0
    ta, tb = anatomy_targets(a), anatomy_targets(b)
    assert set(ta) == set(ANATOMY_TARGETS) and ta != tb


def test_build_benchmark_shapes_and_labels():
    b = build_benchmark(BenchmarkConfig(patients=6, images_per_patient=2, prevalence=0.5, **GRID))
    assert b["images"].shape == (12, 16, 16) and b["images"].min() >= 0 and b["images"].max() <= 1
    assert b["labels"].shape == (12, len(FINDINGS)) and set(np.unique(b["labels"])) <= {0, 1}
    assert b["targets"].shape == (12, len(ANATOMY_TARGETS)) and np.all(b["targets"] > 0)
    assert len(set(b["patients"].tolist())) == 6
    # the same patient twice, with different findings: images differ only through the findings
    b2 = build_benchmark(BenchmarkConfig(patients=6, images_per_patient=2, prevalence=0.5, **GRID))
    np.testing.assert_array_equal(b["images"], b2["images"])  # deterministic


def test_cli_benchmark(tmp_path, capsys):
    from xwin.model import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(16, 8, 1, 192, 12, 3)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model_config": {"size": "tiny", "img_size": 16, "patch_size": 8, "in_chans": 1},
                "target_encoder": vit.state_dict()}, run / "checkpoint.pt")
    cfg = {"data": {"ct_shape": list(GRID["ct_shape"]), "ct_spacing": list(GRID["ct_spacing"])},
           "render": GRID["render"], "model": {"img_size": 16}}
    (run / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "ev"
    rc = main(["--benchmark", "findings", "--checkpoint", str(run), "--out", str(out), "--patients", "10",
               "--images-per-patient", "2", "--prevalence", "0.5", "--bootstrap", "20", "--no-progress", "--no-plot"])
    err = capsys.readouterr().err
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["anatomy"]) == {"xwin", "random", "pixels"}
    assert set(m["anatomy"]["xwin"]) == set(ANATOMY_TARGETS) == set(m["anatomy_family_only_r2"])
    assert m["benchmark"]["patients"] == 10 and m["patients"]["test"] >= 1
    assert sum(m["images"].values()) == 20
    assert (out / "predictions.csv").is_file() and not list(out.glob(".partial-*"))
    rc = main(["--benchmark", "findings", "--checkpoint", str(run), "--out", str(tmp_path / "x"), "--patients", "2"])
    assert rc == 2 and "at least 6 patients" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

"""``python -m xwin.reconstruct --from-model``: the pipeline end to end on a tiny random model, the bounds on the
same grid, the symmetric completion, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _decoder_helpers import FAST_DECODER, TINY_CFG, one_torch_thread, tiny_world_checkpoint  # noqa: F401

from xwin.decoder import train_stage


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("fm") / "run"
    tiny_world_checkpoint(run)
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        train_stage(run, {"decoder": {**FAST_DECODER, "steps": 2}})
    return run


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory):
    from xwin.data import chest_phantom
    from xwin.io import save_volume

    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    vol = chest_phantom((30, 30, 24), (10.0, 10.0, 12.0), seed=424242)      # another grid than the model's
    save_volume(vol, path)
    return path

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_ct_end_to_end_through_the_reconstruct_cli(run_dir, ct_file, tmp_path):
    import nibabel as nib

    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "xwin.reconstruct", "--from-model", str(run_dir / "checkpoint.pt"),
                        "--ct", str(ct_file), "--out", str(out), "--methods", "tv-prior,fdk", "--iterations", "2"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    for row in ("frontal/tv-prior", "prior/tv-prior", "true/tv-prior", "frontal/fdk", "true/fdk", "lower/mean-training-ct"):
        v = m["volume_3d"][row]
        assert np.isfinite(v["psnr_db"]) and -1 <= v["ssim"] <= 1, row
    # every row on the same field of view and data range
    assert len({(v["fov_voxels"], tuple(v["data_range"]["mu_per_mm"])) for v in m["volume_3d"].values()}) == 1
    assert set(m["views_2d"]) == {"frontal", "prior"}
    assert len(m["views_2d"]["frontal"]["per_view_psnr_db"]) == 4          # 5 yaws minus the frontal input
    img = nib.load(str(out / "recon.nii.gz"))
    assert img.shape == tuple(TINY_CFG["data"]["ct_shape"])
    np.testing.assert_allclose(img.affine, np.asarray(m["grid"]["affine"]), atol=1e-4)
    # the grid is the model's (12 x 12 x 14 mm) placed in the CT's own world frame: its centre lies in the CT
    src = nib.load(str(ct_file))
    c = img.affine[:3, :3] @ ((np.array(img.shape) - 1) / 2) + img.affine[:3, 3]
    ijk = np.linalg.solve(src.affine[:3, :3], c - src.affine[:3, 3])
    assert np.all(ijk > 0) and np.all(ijk < np.array(src.shape) - 1)
    assert (out / "from_model.png").stat().st_size > 10_000


def test_bounds_are_computed_on_the_same_grid(run_dir):
    from xwin.data import chest_phantom
    from xwin.decoder import load_entry, render_line_integrals, training_entries
    from xwin.intensity import hu_to_mu
    from xwin.reconstruct import fdk
    from xwin.reconstruct.from_model import Pipeline, evaluate_ct, mean_training_ct

    pipe = Pipeline(run_dir / "checkpoint.pt")
    d = pipe.cfg["data"]
    vol = chest_phantom(d["ct_shape"], d["ct_spacing"], seed=777)
    mean = mean_training_ct(pipe.cfg, vol.affine)
    manual = torch.stack([hu_to_mu(load_entry(e, pipe.cfg).data.float()) for e in training_entries(pipe.cfg)]).mean(0)
    assert training_entries(pipe.cfg) == [("phantom", 0), ("phantom", 1)]
    torch.testing.assert_close(mean, manual)
    res = evaluate_ct(pipe, vol, methods=["fdk"], yaws=pipe.yaws(), mean_ct=mean, scales=("frontal",))
    a = res["arrays"]
    assert a["recs"][("true", "fdk")].shape == a["mu"].shape == mean.shape
    # the upper bound is FDK of the true projections of exactly these views
    mu = hu_to_mu(vol.data.float())
    p, g = render_line_integrals(mu, vol.affine, pipe.yaws(), pipe.cfg, size=pipe.img_size)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(a["recs"][("true", "fdk")], fdk(p, g, mu.shape, affine=vol.affine).float())
    v = res["metrics"]["volume_3d"]
    assert v["true/fdk"]["fov_voxels"] == v["lower/mean-training-ct"]["fov_voxels"] == res["metrics"]["fov_voxels"]


def test_mirror_completion_adds_only_missing_conjugates():
    from xwin.reconstruct.from_model import mirror_complete

    yaws = np.array([-90.0, -45.0, 0.0, 45.0, 90.0])
    p = torch.arange(5 * 2 * 3, dtype=torch.float32).reshape(5, 2, 3)
    p2, g2 = mirror_complete(p, yaws, TINY_CFG, (0.0, 0.0, 0.0))
    assert p2.shape[0] == g2.num_views == 8                  # +135, +180, +225; 270 = -90 and 90 exist already
    torch.testing.assert_close(p2[5], torch.flip(p[1], dims=[-1]))
    # the conjugate view's source sits where the original's detector centre direction points
    src = g2.source.numpy()
    np.testing.assert_allclose(src[6], -src[2], atol=1e-9)  # yaw 180 vs yaw 0


def test_radiograph_input_and_bad_options(run_dir, tmp_path, capsys):
    from PIL import Image

    from xwin.reconstruct.from_model import main

    png = tmp_path / "cxr.png"
    Image.fromarray((np.random.default_rng(0).random((40, 36)) * 255).astype(np.uint8)).save(png)
    ck = str(run_dir / "checkpoint.pt")
    assert main(["--from-model", ck, "--image", str(png), "--out", str(tmp_path / "o"), "--methods", "fdk"]) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["scale"]["prior_s"] > 0 and (tmp_path / "o" / "recon.nii.gz").exists()
    capsys.readouterr()
    for argv, msg in (([ck, "--image", str(png), "--scale", "frontal"], "needs line integrals"),
                      ([str(tmp_path / "nope.pt"), "--ct", "x.nii.gz"], "not found"),
                      ([ck, "--ct", str(tmp_path / "missing.nii.gz")], "cannot read CT"),
                      ([ck, "--image", str(png), "--methods", "art"], "--methods")):
        assert main(["--from-model", *argv, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    ck_only = tmp_path / "lonely"
    tiny_world_checkpoint(ck_only)
    assert main(["--from-model", str(ck_only / "checkpoint.pt"), "--image", str(png), "--out", str(tmp_path / "b2")]) == 2
    assert "no projection decoder" in capsys.readouterr().err

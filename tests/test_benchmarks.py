"""The DRR speed benchmark as a CI smoke test: `drr_speed.py --quick` runs, checks against the reference,
and writes sane numbers; plus the helpers its numbers rest on (row subsets, work counts, peer camera), where
results go, and the contention script (point 6 of issue 10) on a tiny case."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import adapters as A  # noqa: E402
import common as C  # noqa: E402
import report as Rp  # noqa: E402

from xwin.geometry import xwin_pose  # noqa: E402
from xwin.io import Volume  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "drr_speed.py"), "--quick", "--threads", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return out, p.stdout


def test_quick_writes_json_and_markdown(quick_run):
    out, stdout = quick_run
    data = json.loads((out / "drr_speed_quick_cpu.json").read_text())
    md = (out / "drr_speed_quick_cpu.md").read_text()
    assert "| xwin-torch | siddon | fwd |" in md
    meta = data["meta"]
    assert meta["dtype"] == "float32" and meta["device"] == "cpu"
    assert meta["env"]["torch"] == torch.__version__
    assert meta["ct"]["shape"] == [128, 128, 133]
    assert meta["copy_bandwidth_gbs"] > 0
    assert "wrote" in stdout


def test_quick_numbers_are_sane_and_checked(quick_run):
    out, _ = quick_run
    results = json.loads((out / "drr_speed_quick_cpu.json").read_text())["results"]
    xwin = [r for r in results if r["case"]["impl"] == "xwin-torch"]
    assert len(xwin) == 5
    for r in results:
        c = r["case"]
        if c["impl"] in ("diffdrr", "nanodrr") and "skipped" in r:
            assert r["skipped"] and "\n" not in r["skipped"]          # a one-line reason
            continue
        assert "error" not in r and "skipped" not in r, r
        # checked against the float64 reference before timing, and passed
        assert r["check_passed"] is True, r
        assert r["finite"] is True
        assert 0 <= r["rel_err_fwd"] <= r["tolerance"][0]
        if c["mode"] == "fwdbwd":
            assert math.isfinite(r["rel_err_grad"])
            if r["tolerance"][1] is not None:
                assert r["rel_err_grad"] <= r["tolerance"][1]
        assert len(r["times_s"]) >= 2
        for key in ("median_s", "drrs_per_s", "rays_per_s", "samples_per_s", "peak_mem_mb", "bound_s",
                    "gathered_gb_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        assert all(math.isfinite(t) and t > 0 for t in r["times_s"])
        assert r["base_mem_mb"] > 0   # (peak >= base holds by construction: drr_speed clamps it)
        n = r["counts"]
        assert n["rays"] == c["views"] * c["size"] ** 2
        assert n["rays"] >= n["rays_hit"] > 0
        assert n["siddon_segments"] >= n["rays_hit"]
        assert math.isclose(r["drrs_per_s"] * r["median_s"], c["vols"] * c["views"])


def test_row_subset_keeps_the_selected_pixels():
    g = xwin_pose(torch.tensor([0.0, 30.0]), 5.0, 0.0, size=37, pixel_size=3.0, isocenter=(1.0, 2.0, 3.0))
    for every in (1, 4, 16):
        sub = C.row_subset(g, every)
        assert torch.allclose(sub.pixel_positions(), g.pixel_positions()[:, ::every], atol=1e-9)


def test_siddon_segment_count_matches_the_voxel_walk():
    from xwin.kernels import reference as R
    from xwin.kernels._prep import affine_batch, ray_params

    shape = (20, 17, 9)
    aff = np.diag([1.5, 1.2, 2.5, 1.0])
    aff[:3, 3] = [-14.0, -9.0, -10.0]
    g = xwin_pose(torch.tensor([10.0, 75.0]), 12.0, 3.0, size=24, pixel_size=1.5)
    prm = ray_params(g, affine_batch(aff, 1))[0]
    walked = 0
    for _, o, e, tlo, thi in R.ray_chunks(prm, "cone", g.rows, g.cols, 1 << 16):
        for _, _, seg in R.siddon_walk(o, e, tlo, thi, shape):
            walked += int((seg > 0).sum())
    counted = C.count_work(g, aff, shape, 1.0)["siddon_segments"]
    assert walked > 0
    assert abs(counted - walked) <= 0.002 * walked


def test_diffdrr_pose_renders_the_same_rays():
    if A.peer_available("diffdrr"):
        pytest.skip(A.peer_available("diffdrr"))
    from xwin.kernels import project

    g = xwin_pose(torch.tensor([-40.0, 0.0, 65.0]), 0.0, 0.0, size=24, pixel_size=9.0, isocenter=(0, 0, 0))
    mu = torch.rand(30, 26, 20, generator=torch.Generator().manual_seed(0)) * 0.02
    aff = np.diag([4.0, 4.0, 5.0, 1.0])
    aff[:3, 3] = [-58.0, -50.0, -47.5]
    dd = A.DiffDRRRenderer(Volume(mu, aff), g, "siddon", torch.device("cpu"))
    assert dd.check_rays(g) < 1e-3                                      # mm
    ref = project(mu.double(), g, affine=aff, method="siddon", backend="torch")
    assert C.rel_err(dd(dd.pose(g)), ref) < 1e-4


def test_reference_speed_script_prints_times_and_checksums(capsys):
    """The A/B timing script runs on the sample CT and prints, for both methods, times and the checksums of
    the projection and backprojection (which equal the projector's own sums)."""
    import reference_speed

    from xwin.kernels import backproject, project

    threads = torch.get_num_threads()
    try:
        assert reference_speed.main(["--ct", "sample", "--size", "16", "--reps", "1"]) is None
    finally:
        torch.set_num_threads(threads)   # the script pins 1 thread; do not leak that into later tests
    out = capsys.readouterr().out
    vol, _ = C.load_ct("sample")
    g = C.make_geometry(vol, 16, 25.0, 1)
    aff = torch.tensor(vol.affine)
    w = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))
    for method in ("siddon", "trilinear"):
        line = next(l for l in out.splitlines() if l.startswith(method))
        p = project(vol.data, g, affine=aff, method=method).double().sum().item()
        v = backproject(w, g, vol.spatial_shape, affine=aff, method=method).double().sum().item()
        assert p > 0 and v > 0
        assert f"checksums {p:.6f} {v:.6f}" in line


def test_results_go_to_the_ignored_folder_unless_tables_are_asked_for():
    import drr_speed

    assert Rp.results_dir(False) == REPO / "benchmarks" / "results" / "local"
    assert Rp.results_dir(True) == REPO / "benchmarks" / "results"
    assert drr_speed.plan(drr_speed.parser().parse_args(["--quick", "--device", "cpu"])).out_dir == Rp.results_dir(False)
    p = drr_speed.plan(drr_speed.parser().parse_args(["--quick", "--device", "cpu", "--write-tables"]))
    assert p.out_dir == Rp.results_dir(True)
    assert p.preset == "quick" and {c.impl for c in p.cases} == {"xwin-torch", "diffdrr", "nanodrr"}


def test_every_implementation_has_an_adapter_and_unavailable_ones_say_why():
    import drr_speed

    vol = Volume(torch.zeros(8, 8, 8), np.eye(4))
    cases = drr_speed.preset("gpu", "cpu")          # every implementation appears in the GPU preset
    assert {c.impl for c in cases} == set(A.ADAPTERS)
    why = A.ADAPTERS["xwin-triton"].unavailable(cases[0], vol, 16.0)
    assert why and "CUDA" in why
    assert A.ADAPTERS["xwin-torch"].unavailable(cases[0], vol, 16.0) is None


def test_xwin_adapter_forward_and_gradient_equal_the_projector():
    """The adapter calls the projector as a user does: forward, and backward of (proj · w).sum()."""
    import drr_speed
    from xwin.kernels import backproject, project

    vol = Volume(torch.rand(12, 10, 9, generator=torch.Generator().manual_seed(0)), np.diag([3.0, 3.0, 4.0, 1.0]))
    case = drr_speed.Case("xwin-torch", "siddon", "fwdbwd", 8, 6.0, 2)
    geoms = [C.make_geometry(vol, 8, 6.0, 2, s) for s in range(2)]
    a = A.ADAPTERS["xwin-torch"](case, vol, vol.data, geoms, torch.device("cpu"), 0.5)
    ref = project(vol.data, geoms[1], affine=vol.affine)
    assert torch.allclose(a(1), ref)
    w = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a(1, w), ref)
    assert torch.allclose(a.grad(), backproject(w, geoms[1], vol.spatial_shape, affine=vol.affine), rtol=1e-5, atol=1e-6)


def test_contention_script_measures_idle_and_contended(tmp_path):
    """contention.py on a tiny Siddon case: both runs timed with torch's default threads, the ratio and the
    load averages recorded, markdown written."""
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "contention.py"), "--only", "siddon", "--ct", "sample",
                        "--size", "16", "--reps", "2", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    data = json.loads((tmp_path / "contention.json").read_text())
    (row,) = data["summary"]
    assert row["workload"] == "siddon"
    assert row["idle_median_s"] > 0 and row["contended_median_s"] > 0
    assert math.isclose(row["ratio"], row["contended_median_s"] / row["idle_median_s"])
    runs = data["runs"]["siddon"]
    assert runs["idle"]["competitors"] == 0 and runs["contended"]["competitors"] == 1
    for r in runs.values():
        assert len(r["times_s"]) == 2 and len(r["loadavg_start"]) == 3
        assert r["torch_threads"] == data["meta"]["torch_threads_default"]
        assert r["omp_wait_policy"] == "PASSIVE"
    assert "| Siddon forward 16²" in (tmp_path / "contention.md").read_text()

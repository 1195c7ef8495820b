"""RTK geometry <-> xwin vector geometry, MetaImage I/O, geometry JSON; and, where ITK/RTK is installed
(``pip install itk-rtk``), agreement with RTK itself: its matrices, its Joseph projections, its FDK."""

import json

import numpy as np
import pytest
import torch

from xwin.geometry import Geometry, circular_orbit
from xwin.io import XwinIOError, load_projections, load_volume, read_metaimage, write_metaimage
from xwin.reconstruct.rtk import (RTKGeometry, centered_detector_frame, load_geometry, read_rtk_geometry, rtk_matrices,
                                  rtk_to_vector, write_rtk_geometry)

PARAMS = ("sid", "sdd", "gantry", "proj_offset_x", "proj_offset_y", "out_of_plane", "in_plane", "source_offset_x",
          "source_offset_y")


def random_rtk(rng, V=6, parallel=False):
    g = dict(sid=rng.uniform(500, 1000, V), sdd=np.zeros(V) if parallel else rng.uniform(1100, 1600, V),
             gantry=rng.uniform(0, 360, V), proj_offset_x=rng.uniform(-60, 60, V), proj_offset_y=rng.uniform(-60, 60, V),
             out_of_plane=rng.uniform(-20, 20, V), in_plane=rng.uniform(-20, 20, V),
             source_offset_x=rng.uniform(-20, 20, V), source_offset_y=rng.uniform(-20, 20, V))
    return RTKGeometry(**g)


def random_frame(rng, rows, cols):
    """An ITK stack frame: spacing, origin, and a 2-D direction (rotation or flip) in the detector plane."""
    a = rng.uniform(0, 2 * np.pi)
    d = np.eye(3)
    d[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    if rng.uniform() < 0.5:
        d[:, 0] *= -1
    m = np.eye(4)
    m[:3, :3] = d @ np.diag([rng.uniform(0.5, 2), rng.uniform(0.5, 2), 1.0])
    m[:3, 3] = [rng.uniform(-200, 0), rng.uniform(-200, 0), 0.0]
    return m


def detector_hit(g: Geometry, x_world):
    """(col, row) where the ray of every view through world point ``x_world`` (3,) meets the detector."""
    out = []
    for n in range(g.num_views):
        c, u, v = (t[n].numpy() for t in (g.center, g.u, g.v))
        if g.kind == "cone":
            s = g.source[n].numpy()
            d = x_world - s
        else:
            d = g.direction[n].numpy()
            s = x_world
        # s + t d = c + a u + b v
        a, b, _ = np.linalg.solve(np.stack([u, v, -d], 1), s - c)
        out.append((a + (g.cols - 1) / 2, b + (g.rows - 1) / 2))
    return np.array(out)


@pytest.mark.parametrize("parallel", [False, True])
def test_vector_geometry_reproduces_rtk_projection_matrices(parallel):
    """A world point projects to the same pixel through RTK's 3x4 matrix (with the stack's frame) and
    through the converted vector geometry, for random parameters, offsets, angles and stack frames."""
    rng = np.random.default_rng(1 + parallel)
    for _ in range(4):
        rg = random_rtk(rng, parallel=parallel)
        rows, cols = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        frame = random_frame(rng, rows, cols)
        g_lps = rtk_to_vector(rg, frame, rows, cols, world="lps")
        g_ras = rtk_to_vector(rg, frame, rows, cols)
        mats = rtk_matrices(rg)
        inv2 = np.linalg.inv(frame[:2, :2])
        for x in rng.uniform(-100, 100, (5, 3)):
            hom = mats @ np.append(x, 1.0)
            det = hom[:, :2] / hom[:, 2:3]                           # RTK detector coordinates
            view = np.arange(rg.num_views)[:, None]
            ij = (det - frame[:2, 3] - view * frame[:2, 2]) @ inv2.T     # ITK index (column, row)
            np.testing.assert_allclose(detector_hit(g_lps, x), ij, atol=1e-7)
            np.testing.assert_allclose(detector_hit(g_ras, x * [-1, -1, 1]), ij, atol=1e-7)


def test_circular_rtk_geometry_is_the_expected_orbit():
    """Derived by hand from RTK's conventions: gantry θ puts the source at (SID sin θ, 0, SID cos θ) in LPS,
    the rotation axis is y; in RAS the source is at (−SID sin θ, 0, SID cos θ); ProjectionOffsetX moves the
    detector along the rotated x."""
    th = np.array([0.0, 90.0, 200.0])
    rg = RTKGeometry(sid=1000.0, sdd=1500.0, gantry=th, proj_offset_x=30.0)
    g = rtk_to_vector(rg, centered_detector_frame(11, 21, (2.0, 1.5)), 11, 21)
    t = np.radians(th)
    np.testing.assert_allclose(g.source.numpy(), np.stack([-1000 * np.sin(t), 0 * t, 1000 * np.cos(t)], 1), atol=1e-9)
    det = np.stack([-(-500 * np.sin(t) + 30 * np.cos(t)), 0 * t, -500 * np.cos(t) - 30 * np.sin(t)], 1)
    np.testing.assert_allclose(g.center.numpy(), det, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(g.u.numpy(), axis=1), 1.5)
    np.testing.assert_allclose(g.v.numpy(), [[0, -2.0, 0]] * 3, atol=1e-12)    # rows step along LPS +y = RAS -y


def test_rtk_xml_round_trip_and_checks(tmp_path):
    rng = np.random.default_rng(3)
    rg = random_rtk(rng, V=4)
    path = tmp_path / "g.xml"
    write_rtk_geometry(rg, path)
    back = read_rtk_geometry(path)
    for f in PARAMS:
        np.testing.assert_allclose(getattr(back, f), getattr(rg, f), atol=1e-12)
    np.testing.assert_allclose(back.matrices, rtk_matrices(rg), atol=1e-9)
    # global parameters (outside <Projection>) hold for every projection, as RTK's writer uses them
    path.write_text('<?xml version="1.0"?><RTKThreeDCircularGeometry version="3">'
                    "<SourceToIsocenterDistance>900</SourceToIsocenterDistance>"
                    "<SourceToDetectorDistance>1300</SourceToDetectorDistance>"
                    "<Projection><GantryAngle>10</GantryAngle></Projection>"
                    "<Projection><GantryAngle>20</GantryAngle><ProjectionOffsetX>5</ProjectionOffsetX></Projection>"
                    "</RTKThreeDCircularGeometry>")
    g2 = read_rtk_geometry(path)
    assert g2.sid.tolist() == [900, 900] and g2.sdd.tolist() == [1300, 1300] and g2.proj_offset_x.tolist() == [0, 5]
    bad = path.read_text().replace("<GantryAngle>20</GantryAngle>",
                                   "<GantryAngle>20</GantryAngle><Matrix>1 0 0 0 0 1 0 0 0 0 1 0</Matrix>")
    path.write_text(bad)
    with pytest.raises(XwinIOError, match="Matrix"):
        read_rtk_geometry(path)
    path.write_text("<foo/>")
    with pytest.raises(XwinIOError, match="RTKThreeDCircularGeometry"):
        read_rtk_geometry(path)


def test_geometry_json_file_is_read_and_checked_against_the_stack(tmp_path):
    g = circular_orbit(torch.linspace(0, 3, 5), rows=7, cols=9, pixel_size=(1.5, 2.0), sid=600, sdd=900)
    back = Geometry.from_json(g.to_json())
    for a in ("source", "center", "u", "v"):
        assert torch.equal(getattr(back, a), getattr(g, a))
    assert (back.rows, back.cols, back.kind) == (7, 9, "cone")
    p = tmp_path / "g.json"
    p.write_text(json.dumps({"geometry": json.loads(g.to_json())}))         # as in a metrics file
    assert load_geometry(p, rows=7, cols=9)[0].num_views == 5
    with pytest.raises(ValueError, match="7x9 detector"):
        load_geometry(p, rows=8, cols=9)


@pytest.mark.parametrize("suffix,compress", [(".mha", False), (".mha", True), (".mhd", False)])
def test_metaimage_round_trip(tmp_path, suffix, compress):
    rng = np.random.default_rng(0)
    arr = rng.standard_normal((3, 4, 5)).astype(np.float32)
    d = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1.0]])
    path = tmp_path / f"x{suffix}"
    write_metaimage(path, arr, origin=[1, 2, 3], spacing=[0.5, 0.25, 2], direction=d, compress=compress)
    mi = read_metaimage(path)
    assert np.array_equal(mi.array, arr) and mi.size == (5, 4, 3)
    np.testing.assert_allclose(mi.direction, d)
    np.testing.assert_allclose(mi.index_to_physical()[:3, 3], [1, 2, 3])
    np.testing.assert_allclose(mi.index_to_physical()[:3, :3], d @ np.diag([0.5, 0.25, 2]))
    stack = load_projections(path)
    assert tuple(stack.data.shape) == (3, 4, 5) and torch.equal(stack.data, torch.from_numpy(arr))
    vol = load_volume(path)                    # a MetaImage volume: ITK order reversed, LPS -> RAS
    assert vol.shape == (5, 4, 3) and float(vol.data[4, 1, 2]) == float(arr[2, 1, 4])
    np.testing.assert_allclose(vol.affine[:3, 3], [-1, -2, 3])


def test_metaimage_errors(tmp_path):
    p = tmp_path / "bad.mha"
    p.write_bytes(b"NDims = 3\nDimSize = 4 4 4\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n" + b"\0" * 10)
    with pytest.raises(XwinIOError, match="truncated"):
        read_metaimage(p)
    p.write_bytes(b"NDims = 3\nDimSize = 4 4 4\nElementType = MET_RGB\nElementDataFile = LOCAL\n")
    with pytest.raises(XwinIOError, match="ElementType"):
        read_metaimage(p)
    p.write_bytes(b"\x89PNG garbage")
    with pytest.raises(XwinIOError):
        read_metaimage(p)


def test_projection_stack_formats_and_i0(tmp_path):
    rng = np.random.default_rng(2)
    p = rng.uniform(0, 3, (4, 5, 6)).astype(np.float32)
    np.save(tmp_path / "p.npy", p)
    assert torch.allclose(load_projections(tmp_path / "p.npy").data, torch.from_numpy(p))
    inten = 1e4 * np.exp(-p)
    np.save(tmp_path / "i.npy", inten)
    st = load_projections(tmp_path / "i.npy", i0=1e4)
    assert torch.allclose(st.data, torch.from_numpy(p), atol=1e-5) and st.info["i0"] == 1e4
    import nibabel as nib

    aff = np.diag([0.5, 0.7, 1.0, 1.0])
    aff[:3, 3] = [10, 20, 0]
    nib.save(nib.Nifti1Image(np.transpose(p, (2, 1, 0)), aff), str(tmp_path / "p.nii.gz"))
    st = load_projections(tmp_path / "p.nii.gz")
    assert torch.allclose(st.data, torch.from_numpy(p))
    np.testing.assert_allclose(st.index_to_physical[:3, 3], [-10, -20, 0])    # as ITK reads it (LPS)
    (tmp_path / "p.txt").write_text("1 2 3")
    np.save(tmp_path / "bad.npy", p[0])
    with pytest.raises(XwinIOError, match="V, rows, cols"):
        load_projections(tmp_path / "bad.npy")
    with pytest.raises(XwinIOError, match="unknown projection stack format"):
        load_projections(tmp_path / "p.txt")


# ---------------------------------------------------------------------------------------- against RTK itself

def _ncc(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(scope="module")
def rtk_runs():  # ~45 s the first time ITK loads RTK's projector modules
    """RTK's Joseph projections and RTK's FDK of a chest phantom under three circular geometries: full scan
    with detector offsets and an out-of-plane tilt, short scan, and a displaced (half-fan) detector."""
    pytest.importorskip("itk")
    from xwin.intensity import hu_to_mu
    from xwin.io import Volume
    from xwin.phantom import chest_phantom
    from xwin.reconstruct.rtk_itk import require_rtk, rtk_fdk, rtk_forward

    try:
        require_rtk()
    except ValueError:
        pytest.skip("ITK is installed without RTK (pip install itk-rtk)")
    torch.set_num_threads(1)
    ph = chest_phantom((44, 44, 14), (8.0, 8.0, 8.0), seed=0)
    mu = torch.nn.functional.pad(hu_to_mu(ph.data), (2, 2, 2, 2, 2, 2))     # air margin: Joseph stops at centres
    aff = ph.affine.copy()
    aff[:3, 3] -= aff[:3, :3] @ np.full(3, 2.0)
    vol = Volume(mu, aff)
    cases = {
        "full": (RTKGeometry(sid=1000.0, sdd=1500.0, gantry=np.arange(90) * 4.0, proj_offset_x=9.0, proj_offset_y=-6.0,
                             out_of_plane=3.0, in_plane=2.0), 26, 72),
        "short": (RTKGeometry(sid=1000.0, sdd=1500.0, gantry=np.linspace(0, 214, 80)), 26, 72),
        "half": (RTKGeometry(sid=1000.0, sdd=1500.0, gantry=np.arange(90) * 4.0, proj_offset_x=12.0 * 16), 26, 40),
    }
    out = {}
    for name, (rg, rows, cols) in cases.items():
        frame = centered_detector_frame(rows, cols, 12.0)
        frame[:2, 3] += [5.0, -3.0]                                          # the stack's own origin counts
        p = rtk_forward(vol, rg, frame, rows, cols)
        out[name] = dict(rg=rg, rows=rows, cols=cols, frame=frame, p=p, fdk=rtk_fdk(p, frame, rg, vol))
    return vol, out


@pytest.mark.slow
@pytest.mark.parametrize("case", ["full", "short", "half"])
def test_xwin_projection_matches_rtk_joseph(rtk_runs, case):
    """Same volume, RTK's geometry converted: xwin's trilinear projection matches RTK's Joseph projection
    (NCC ≥ 0.999) and fits better than the same detector moved by half a pixel along u or v."""
    from xwin.kernels import project

    vol, runs = rtk_runs
    r = runs[case]
    g = rtk_to_vector(r["rg"], r["frame"], r["rows"], r["cols"])
    ours = project(vol.data.float(), g, affine=vol.affine, method="trilinear", step=0.25).numpy()
    err = np.linalg.norm(ours - r["p"]) / np.linalg.norm(r["p"])
    assert _ncc(ours, r["p"]) >= 0.999, _ncc(ours, r["p"])
    for du, dv in ((0.5, 0), (-0.5, 0), (0, 0.5), (0, -0.5)):
        shift = np.eye(4)
        shift[:2, 3] = [du, dv]
        gs = rtk_to_vector(r["rg"], r["frame"] @ shift, r["rows"], r["cols"])
        moved = project(vol.data.float(), gs, affine=vol.affine, method="trilinear", step=0.25).numpy()
        assert np.linalg.norm(moved - r["p"]) / np.linalg.norm(r["p"]) > 2 * err
        assert _ncc(moved, r["p"]) < _ncc(ours, r["p"])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["full", "short", "half"])
def test_xwin_fdk_of_rtk_projections_matches_rtk_fdk(rtk_runs, case):
    """xwin's FDK of RTK's projections (converted geometry) equals RTK's FDK of them: relative difference over
    the field of view measured 1.4e-3 for the full scan with a tilted, offset detector (the two handle the
    tilt differently), ~1e-5 for the short scan and the half-fan detector; PSNR against the truth within
    0.5 dB of RTK's or better."""
    from xwin.reconstruct import fdk
    from xwin.reconstruct.filters import fov_mask
    from xwin.reconstruct.report import image_metrics

    vol, runs = rtk_runs
    r = runs[case]
    g = rtk_to_vector(r["rg"], r["frame"], r["rows"], r["cols"])
    rec, info = fdk(torch.from_numpy(r["p"]), g, vol.spatial_shape, affine=vol.affine, return_info=True)
    m = fov_mask(g, vol.spatial_shape, affine=vol.affine)
    theirs = r["fdk"].data
    np.testing.assert_allclose(r["fdk"].affine, vol.affine, atol=1e-5)
    rel = float((rec - theirs)[m].norm() / theirs[m].norm())
    print(f"{case}: relative difference {rel:.2e}")
    assert rel < (5e-3 if case == "full" else 1e-4)
    ps_ours = image_metrics(rec, vol.data, m)["psnr_db"]
    ps_rtk = image_metrics(theirs, vol.data, m)["psnr_db"]
    assert ps_ours >= ps_rtk - 0.5
    if case == "half":
        assert "displaced" in info["orbit"]["redundancy"]


def _rtk_joseph_backproject(p, frame, rg, like):
    """RTK's JosephBackProjectionImageFilter of the stack ``p`` onto the grid of ``like`` (μ volume)."""
    from xwin.reconstruct.rtk_itk import _empty_volume, require_rtk, rtk_geometry, stack_image, volume_from_itk

    itk, rtk = require_rtk()
    img_t = itk.Image[itk.F, 3]
    bp = rtk.JosephBackProjectionImageFilter[img_t, img_t].New()
    bp.SetInput(0, _empty_volume(like))
    bp.SetInput(1, stack_image(p, frame))
    bp.SetGeometry(rtk_geometry(rg))
    bp.Update()
    return volume_from_itk(bp.GetOutput()).data


@pytest.mark.slow
@pytest.mark.parametrize("case", ["full", "short", "half"])
def test_xwin_joseph_equals_rtk_joseph_and_its_backprojection(rtk_runs, case):
    """xwin's Joseph operator (xwin.reconstruct.joseph) is RTK's Joseph forward projector on a volume with an
    air margin (same numbers to float32 rounding), and its exact adjoint is RTK's Joseph backprojector away from
    the grid's two outer voxel layers (RTK weights a ray's first and last plane inside the grid by the fraction
    of the step that lies inside and clamps at the border; with two layers of air both see the same volume)."""
    from xwin.reconstruct.joseph import JosephProjector

    vol, runs = rtk_runs
    r = runs[case]
    g = rtk_to_vector(r["rg"], r["frame"], r["rows"], r["cols"])
    A = JosephProjector(g, vol.spatial_shape, affine=vol.affine)
    ours = A(vol.data.float()).numpy()
    assert np.linalg.norm(ours - r["p"]) / np.linalg.norm(r["p"]) < 1e-5
    y = np.random.default_rng(0).uniform(0, 1, r["p"].shape).astype(np.float32)
    theirs = _rtk_joseph_backproject(y, r["frame"], r["rg"], vol)[2:-2, 2:-2, 2:-2]
    bp = A.T(torch.from_numpy(y))[2:-2, 2:-2, 2:-2]
    assert float((bp - theirs).norm() / theirs.norm()) < 1e-5

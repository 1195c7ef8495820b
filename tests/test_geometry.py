"""Geometry builders: the conventions docs/architecture.md and the docstrings promise."""

import math

import numpy as np
import pytest
import torch

from xwin.geometry import Geometry, circular_orbit, euler_zxy, xwin_pose
from xwin.kernels import project


def test_pixel_positions_follow_the_formula():
    g = Geometry.cone([0, 0, 100], [1, 2, 3], [0.5, 0, 0], [0, -0.25, 0], rows=3, cols=4)
    pos = g.pixel_positions()
    assert pos.shape == (1, 3, 4, 3)
    # pixel (r, c) = center + (c - 1.5) u + (r - 1) v
    assert torch.allclose(pos[0, 0, 0], torch.tensor([1 - 0.75, 2 + 0.25, 3], dtype=torch.float64))
    assert torch.allclose(pos[0, 2, 3], torch.tensor([1 + 0.75, 2 - 0.25, 3], dtype=torch.float64))


def test_circular_orbit_positions_and_distances():
    th = torch.tensor([0.0, math.pi / 2, 1.0], dtype=torch.float64)
    g = circular_orbit(th, rows=5, cols=7, pixel_size=(0.8, 1.2), sid=600, sdd=1000, isocenter=(1, 2, 3))
    iso = torch.tensor([1.0, 2, 3], dtype=torch.float64)
    assert torch.allclose((g.source - iso).norm(dim=1), torch.full((3,), 600.0, dtype=torch.float64))
    assert torch.allclose((g.source - g.center).norm(dim=1), torch.full((3,), 1000.0, dtype=torch.float64))
    assert torch.allclose(g.source[0], iso + torch.tensor([600.0, 0, 0], dtype=torch.float64))
    assert torch.allclose(g.source[1], iso + torch.tensor([0.0, 600, 0], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(g.u.norm(dim=1), torch.full((3,), 1.2, dtype=torch.float64))
    assert torch.allclose(g.v, torch.tensor([0, 0, -0.8], dtype=torch.float64).expand(3, 3))
    gp = circular_orbit(th, rows=5, cols=7, pixel_size=1.0, kind="parallel")
    assert torch.allclose(gp.direction[0], torch.tensor([-1.0, 0, 0], dtype=torch.float64))


def test_detector_offset_shifts_the_image():
    vol = torch.zeros(21, 21, 21, dtype=torch.float64)
    vol[10, 10, 10] = 1.0
    iso = (10, 10, 10)
    g0 = circular_orbit([0.0], rows=9, cols=9, pixel_size=1.0, kind="parallel", isocenter=iso)
    g1 = circular_orbit([0.0], rows=9, cols=9, pixel_size=1.0, kind="parallel", isocenter=iso, det_offset=(2.0, 0.0))
    p0, p1 = project(vol, g0)[0], project(vol, g1)[0]
    r0, c0 = divmod(int(p0.argmax()), 9)
    r1, c1 = divmod(int(p1.argmax()), 9)
    assert (r0, c0) == (4, 4) and (r1, c1) == (4, 2)


def test_euler_zxy_is_a_rotation_and_composes_in_order():
    R = euler_zxy(torch.tensor([10.0, -30]), torch.tensor([5.0, 20]), torch.tensor([0.0, 45]))
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(R @ R.transpose(1, 2), eye.expand(2, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(2, dtype=torch.float64))
    yaw_only = euler_zxy(90.0, 0.0, 0.0)[0]
    assert torch.allclose(yaw_only @ torch.tensor([1.0, 0, 0], dtype=torch.float64),
                          torch.tensor([0.0, 1, 0], dtype=torch.float64), atol=1e-12)


def test_xwin_pose_conventions():
    g = xwin_pose(0.0, size=512)
    # frontal PA view: source posterior (−y), 700 mm from the isocentre, detector 320 mm anterior
    assert torch.allclose(g.source[0], torch.tensor([0.0, -700, 0], dtype=torch.float64))
    assert torch.allclose(g.center[0], torch.tensor([0.0, 320, 0], dtype=torch.float64))
    assert g.rows == g.cols == 512
    assert torch.allclose(g.u[0], torch.tensor([-1.0, 0, 0], dtype=torch.float64))   # columns: patient right -> left
    assert torch.allclose(g.v[0], torch.tensor([0.0, 0, -1], dtype=torch.float64))   # rows: head -> feet
    # positive yaw moves the source towards the patient's right (+x); yaw 90 is a lateral view
    g = xwin_pose(torch.tensor([30.0, 90.0]), size=224)
    assert g.source[0, 0] > 0 and torch.allclose(g.source[1], torch.tensor([700.0, 0, 0], dtype=torch.float64), atol=1e-9)
    assert math.isclose(g.u[0].norm().item(), 512 / 224)
    # positive pitch moves the source towards the feet (−z), the detector towards the head
    gp = xwin_pose(0.0, 20.0, 0.0)
    assert gp.source[0, 2] < 0 and gp.center[0, 2] > 0
    # roll spins the detector in its own plane: the source stays put
    gr = xwin_pose(0.0, 0.0, 30.0)
    assert torch.allclose(gr.source[0], torch.tensor([0.0, -700, 0], dtype=torch.float64), atol=1e-9)
    assert not torch.allclose(gr.u[0], torch.tensor([-1.0, 0, 0], dtype=torch.float64))


def test_xwin_pose_image_orientation_on_a_marked_volume():
    """A marker on the patient's right (RAS+: +x) and head side (+z) lands top-left, as on a PA film."""
    vol = torch.zeros(64, 64, 64)
    vol[48:56, 28:36, 40:48] = 1.0            # +x side (index 48..55) and superior (+z)
    aff = np.eye(4)
    aff[:3, :3] *= 4.0
    aff[:3, 3] = -4.0 * 31.5
    img = project(vol, xwin_pose(0.0, size=64, pixel_size=8.0), affine=aff)[0]
    r, c = divmod(int(img.argmax()), 64)
    assert r < 32            # superior -> top rows
    assert c < 32            # patient's right (+x) -> left columns (u runs along −x)


def test_geometry_to_and_select():
    g = circular_orbit(torch.linspace(0, 1, 4), rows=2, cols=3, pixel_size=1, sid=10, sdd=20)
    assert g[1:3].num_views == 2 and g[0].num_views == 1
    assert g.to("cpu").center.dtype == torch.float64
    d = g.as_dict()
    assert d["kind"] == "cone" and len(d["source"]) == 4


def test_geometry_json_round_trip_and_errors(tmp_path):
    import json

    from xwin.geometry import GeometryError

    for g in (circular_orbit([0.1, 0.7], rows=3, cols=4, pixel_size=1.3, sid=50, sdd=80),
              circular_orbit([0.1], rows=2, cols=5, kind="parallel")):
        text = g.to_json()
        d = json.loads(text)
        assert d["type"] == g.kind and d["rows"] == g.rows and len(d["center"]) == g.num_views
        for back in (Geometry.from_json(text), Geometry.from_json({"geometry": d, "loss": [1.0]})):
            assert back.kind == g.kind and (back.rows, back.cols) == (g.rows, g.cols)
            torch.testing.assert_close(back.center, g.center, rtol=0, atol=0)
            torch.testing.assert_close(back.pixel_positions(), g.pixel_positions(), rtol=0, atol=0)
        path = tmp_path / "g.json"
        path.write_text(text)
        assert Geometry.from_json(path).kind == g.kind and Geometry.from_json(str(path)).num_views == g.num_views
    with pytest.raises(GeometryError, match="lacks"):
        Geometry.from_json({"type": "cone", "rows": 2, "cols": 3})
    with pytest.raises(GeometryError, match="type"):
        Geometry.from_json('{"type": "fan"}')
    with pytest.raises(GeometryError, match="cannot read"):
        Geometry.from_json(tmp_path / "missing.json")
    with pytest.raises(GeometryError, match="3"):
        Geometry.from_json({"type": "cone", "rows": 2, "cols": 3, "source": [[0, 0]], "center": [[0, 0, 1]],
                            "u": [[1, 0, 0]], "v": [[0, 1, 0]]})

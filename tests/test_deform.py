"""xwin.deform: seeded smooth deformations of a CT (and its label map, consistently)."""

import numpy as np
import pytest
import torch

from xwin.data import chest_phantom
from xwin.deform import DeformError, random_deformation, random_patient
from xwin.errors import XwinError
from xwin.io import Volume


@pytest.fixture(scope="module")
def phantom():
    return chest_phantom((40, 36, 32), (8.0, 8.0, 8.0), seed=3)


def _ap_depth_mm(vol):
    body = (vol.data > -500).any(dim=2).any(dim=0)  # over y
    idx = torch.nonzero(body)[:, 0]
    return float((idx.max() - idx.min() + 1) * vol.spacing[1])


def test_strength_zero_is_identity(phantom):
    out = random_patient(phantom, seed=5, strength=0.0)
    assert out.shape == phantom.shape
    np.testing.assert_allclose(out.affine, phantom.affine)
    assert torch.allclose(out.data, phantom.data, atol=1e-2)


def test_seeded_deterministic_and_different(phantom):
    a = random_patient(phantom, seed=1)
    b = random_patient(phantom, seed=1)
    c = random_patient(phantom, seed=2)
    assert torch.equal(a.data, b.data)
    assert (a.data - c.data).abs().mean() > 10.0  # HU: visibly different patients
    # the values stay in the input's HU range (interpolation, air fill)
    assert a.data.min() >= phantom.data.min() - 1e-3 and a.data.max() <= phantom.data.max() + 1e-3


def test_depth_varies_with_seed(phantom):
    depths = [_ap_depth_mm(random_patient(phantom, seed=s, strength=1.0)) for s in range(6)]
    assert max(depths) - min(depths) >= 2 * phantom.spacing[1]


def test_labels_follow_ct(phantom):
    labels = Volume((phantom.data > -500).to(torch.int64), phantom.affine)
    d = random_deformation(phantom, seed=7, strength=1.5)
    ct2, lab2 = d.apply(phantom), d.apply(labels)
    assert lab2.data.dtype == torch.int64 and set(lab2.data.unique().tolist()) <= {0, 1}
    agree = ((ct2.data > -500).long() == lab2.data).float().mean()
    assert agree > 0.97


def test_bad_input(phantom):
    with pytest.raises(DeformError):
        random_patient(phantom, seed=0, strength=-1)
    with pytest.raises(XwinError):
        random_patient(Volume(torch.zeros(1, 4, 4), np.eye(4)), seed=0)
    with pytest.raises(XwinError):
        random_deformation(phantom, 0).apply(phantom, mode="cubic")

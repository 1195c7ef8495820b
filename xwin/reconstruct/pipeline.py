"""The reconstruction runs behind ``python -m xwin.reconstruct``, as library functions with explicit parameters.

* :func:`simulate_and_reconstruct` - load a CT (or the embedded sample), downsample, simulate a circular scan,
  optionally add Poisson noise, reconstruct, measure against the CT and write the outputs.
* :func:`reconstruct_projections` - one method (fdk/fbp, sirt, cgls, tv) on given line integrals.
* :func:`prepare_output`, :func:`resolve_device`, :func:`set_threads`, :class:`Stages`, :func:`progress_bar` -
  the pieces both runs (this one and the measured-projections run in :mod:`xwin.reconstruct.measured`) share.

Every bad parameter raises an :class:`~xwin.errors.XwinError` (``ReconstructionError`` or
``ScanError``); unreadable inputs and unwritable outputs raise :class:`xwin.io.XwinIOError`. The output
folder is created only after the inputs have been read and checked.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Optional, Sequence

METHODS = ("fdk", "fbp", "sirt", "cgls", "tv")
RECON_PROJECTORS = ("auto", "joseph", "siddon", "trilinear")
DEFAULT_VIEWS = {"fdk": 360, "fbp": 360, "sirt": 60, "cgls": 60, "tv": 60}
DEFAULT_ITERS = {"sirt": 20, "cgls": 20, "tv": 20}

__all__ = ["METHODS", "DEFAULT_VIEWS", "DEFAULT_ITERS", "DEFAULT_SUBSETS", "RECON_PROJECTORS", "simulate_and_reconstruct",
           "reconstruct_projections", "resolve_recon_projector", "prepare_output", "resolve_device", "set_threads",
           "Stages", "progress_bar", "check_method_options"]


def _error(msg: str):
    from .filters import ReconstructionError

    return ReconstructionError(msg)


class Stages:
    """Wall time per stage."""

    def __init__(self):
        self.t = {}

    def run(self, name, fn, *a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        self.t[name] = round(time.perf_counter() - t0, 3)
        return out


def progress_bar(enabled: bool, total, desc: str, unit: str = "view"):
    """A tqdm bar on stderr (disabled when not ``enabled``) that shows whole numbers."""
    from tqdm.auto import tqdm

    # the voxel-chunked FDK reference reports fractional views done: show whole numbers
    fmt = "{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True,
                file=sys.stderr, bar_format=fmt)


def resolve_device(name: str):
    """``auto`` (CUDA if available), ``cpu`` or ``cuda[:N]`` as a torch.device; a clear error otherwise."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise _error(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _error("--device cuda: no CUDA device is available here (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise _error(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return dev


def set_threads(threads: Optional[int], device) -> None:
    """``threads`` torch CPU threads; by default 1 on the CPU unless OMP_NUM_THREADS is set."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # the torch reference projector runs a Python loop of small tensor ops per voxel step; worker
        # threads cost more at every op than they save (2-core CPU, idle: the default scan's simulation
        # 3.9 s with 1 thread against 10.7 s with 2; 5 OS-SIRT iterations 8.2 s against 19.2 s)
        torch.set_num_threads(1)


def prepare_output(out: str) -> dict:
    """Create folder ``out`` (and check it is writable); the paths of the three outputs."""
    from xwin.io import XwinIOError

    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".xwin_write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as exc:
        raise XwinIOError(f"cannot write to --out {out!r}: {exc.strerror or exc}") from exc
    return {"nifti": os.path.join(out, "recon.nii.gz"), "figure": os.path.join(out, "recon.png"),
            "metrics": os.path.join(out, "metrics.json")}


def resolve_recon_projector(recon_projector: str, projector: str, device) -> str:
    """The operator the iterative methods use: ``auto`` is ``joseph`` on the CPU (RTK's Joseph operator, ~5-8x
    faster there than the Siddon reference, see docs/reconstruct.md) and ``projector`` (the Triton kernels) on a
    GPU; any other value is used as given."""
    if recon_projector not in RECON_PROJECTORS:
        raise _error(f"--recon-projector must be one of {RECON_PROJECTORS}, got {recon_projector!r}")
    if recon_projector != "auto":
        return recon_projector
    return "joseph" if getattr(device, "type", str(device)) == "cpu" else projector


DEFAULT_SUBSETS = 10


def check_method_options(method: str, *, views: Optional[int], subsets: Optional[int], cutoff: float,
                         tv_weight: float) -> None:
    """Option checks that need no data (views for FBP, cutoff, TV weight, subsets ≤ views when given;
    ``subsets=None`` means min(:data:`DEFAULT_SUBSETS`, views))."""
    if method not in METHODS:
        raise _error(f"method must be one of {METHODS}, got {method!r}")
    if method in ("fdk", "fbp") and views is not None and views < 3:
        raise _error(f"filtered backprojection needs at least 3 views, got {views}")
    if not (0 < cutoff <= 1):
        raise _error(f"--cutoff must be in (0, 1], got {cutoff:g}")
    if tv_weight < 0 or not math.isfinite(tv_weight):
        raise _error(f"--tv-weight must be >= 0, got {tv_weight:g}")
    if method in ("sirt", "tv") and views is not None and subsets is not None and subsets > views:
        raise _error(f"--subsets ({subsets}) cannot exceed the number of views ({views})")


def reconstruct_projections(p, geometry, shape: Sequence[int], affine, *, method: str = "fdk",
                            filter: str = "ram-lak", cutoff: float = 1.0, iterations: Optional[int] = None,
                            subsets: Optional[int] = None, tv_weight: float = 1e-5, projector: str = "siddon",
                            noise_norm: Optional[float] = None, show: bool = False, fdk_options: Optional[dict] = None,
                            recon_projector: str = "auto", momentum: bool = False):
    """``(μ volume, info)`` from line integrals ``p`` (V, rows, cols) with ``method``.

    Iterative methods run ``iterations`` (default :data:`DEFAULT_ITERS`); SIRT and CGLS stop by the
    discrepancy principle when ``noise_norm`` is given (TV runs its iterations: stopping it early measured
    worse, 37.05 vs 38.81 dB, see docs/reconstruct.md). ``fdk_options``: extra keywords for :func:`fdk`.
    ``recon_projector``: the iterative methods' operator (:func:`resolve_recon_projector`; ``projector`` is the
    one a simulation used). TV applies its prox once per ``subsets // 10`` subset updates (at least 1).
    ``momentum``: Nesterov extrapolation between the passes of SIRT and TV (ordered subsets).
    """
    from . import filters, iterative

    if method in ("fdk", "fbp"):
        desc = "FDK backproject" if geometry.kind == "cone" else "FBP backproject"
        with progress_bar(show, geometry.num_views, desc) as bar:
            return filters.fdk(p, geometry, shape, affine=affine, filter=filter, cutoff=cutoff,
                               progress=bar.update, return_info=True, **(fdk_options or {}))
    from tqdm.auto import tqdm

    def factory(total, desc):
        return tqdm(total=total, desc=desc, unit="it", disable=not show, leave=False, dynamic_ncols=True,
                    file=sys.stderr)

    op = resolve_recon_projector(recon_projector, projector, p.device)
    common = dict(affine=affine, iterations=iterations or DEFAULT_ITERS[method],
                  noise_norm=None if method == "tv" else noise_norm, method=op, progress=factory,
                  return_info=True)
    subsets = min(subsets or DEFAULT_SUBSETS, geometry.num_views)
    if momentum and method in ("sirt", "tv") and subsets < 2:
        raise _error("--momentum needs ordered subsets (--subsets 2 or more)")
    if method == "sirt":
        return iterative.sirt(p, geometry, shape, subsets=subsets, momentum=momentum, **common)
    if method == "cgls":
        return iterative.cgls(p, geometry, shape, **common)
    return iterative.tv_recon(p, geometry, shape, subsets=subsets, tv_weight=tv_weight,
                              prox_every=max(1, subsets // 10), momentum=momentum, **common)


def simulate_and_reconstruct(ct: Optional[str] = None, *, method: str = "fdk", kind: str = "cone",
                             views: Optional[int] = None, arc=360.0, sid: float = 1000.0, sdd: float = 1500.0,
                             detector=None, pixel_size: Optional[float] = None, downsample: int = 2,
                             projector: str = "siddon", filter: str = "ram-lak", cutoff: float = 1.0,
                             iterations: Optional[int] = None, subsets: Optional[int] = None, tv_weight: float = 1e-5,
                             noise: Optional[float] = None, seed: int = 0, device: str = "auto",
                             threads: Optional[int] = None, out: str = "recon_out", show: bool = False,
                             options: Optional[dict] = None, recon_projector: str = "auto",
                             momentum: bool = False) -> dict:
    """Simulate a circular scan of ``ct`` (path; None = the embedded sample), reconstruct it with ``method``
    and write ``recon.nii.gz`` (HU), ``recon.png`` and ``metrics.json`` to ``out``; returns the metrics dict.

    The parameters are those of ``python -m xwin.reconstruct`` (see its ``--help``); ``options`` is recorded
    in metrics.json as given (the CLI passes its parsed options).
    """
    import numpy as np
    import torch

    from xwin.geometry import GeometryError
    from xwin.intensity import MU_WATER, hu_to_mu

    from . import iterative
    from .scan import ScanError, add_noise, load_ct, scan_geometry, simulate
    from .scan import downsample as block_average

    views = views or DEFAULT_VIEWS.get(method)
    check_method_options(method, views=views, subsets=subsets, cutoff=cutoff, tv_weight=tv_weight)
    dev = resolve_device(device)
    set_threads(threads, dev)
    recon_op = resolve_recon_projector(recon_projector, projector, dev) if method in DEFAULT_ITERS else None

    st = Stages()
    vol_in, source = st.run("load", load_ct, ct)
    vol = st.run("downsample", block_average, vol_in, downsample)
    shape, affine = tuple(vol.data.shape), vol.affine
    try:
        geometry, gdesc = scan_geometry(shape, affine, kind=kind, views=views, arc=arc, sid=sid, sdd=sdd,
                                        pixel_size=pixel_size, detector=detector)
    except GeometryError as exc:
        raise ScanError(f"bad scan geometry: {exc}") from exc
    paths = prepare_output(out)                 # inputs read and checked: now the folder may be created
    mu = hu_to_mu(vol.data.float()).to(dev)
    if show:
        print(f"xwin.reconstruct: {method.upper()} on {source}: {tuple(vol_in.data.shape)} -> {shape} voxels, "
              f"{kind} beam, {views} views over {gdesc['arc_deg']:.1f} deg, detector "
              f"{gdesc['rows']}x{gdesc['cols']}, device {dev}", file=sys.stderr)
    with progress_bar(show, views, "simulate") as bar:
        p = st.run("simulate", simulate, mu, geometry, affine, projector, bar.update)
    noise_norm = None
    if noise:
        p = st.run("noise", add_noise, p, noise, seed)
        noise_norm = iterative.poisson_noise_norm(p, noise)
    rec, info = st.run("reconstruct", reconstruct_projections, p, geometry, shape, affine, method=method,
                       filter=filter, cutoff=cutoff, iterations=iterations, subsets=subsets, tv_weight=tv_weight,
                       projector=projector, noise_norm=noise_norm, show=show, recon_projector=recon_projector,
                       momentum=momentum)
    title = (f"{method.upper()} — {kind} beam, {views} views / {gdesc['arc_deg']:.0f}°, "
             f"{'noise-free' if not noise else f'Poisson I0={noise:g}'} — {source}")
    m = write_outputs(st, paths, rec.float(), mu, geometry, affine, p, info, title,
                      view_labels=[f"{a:.0f}°" for a in gdesc["angles_deg"]],
                      proj_aspect=gdesc["pixel_size_mm"][0] / gdesc["pixel_size_mm"][1], device=dev)
    from .report import peak_memory, write_json

    metrics = {
        "method": method, "input": source, "input_shape": list(vol_in.data.shape),
        "input_affine": np.asarray(vol_in.affine).tolist(), "downsample": downsample,
        "volume_shape": list(shape), "volume_affine": np.asarray(affine).tolist(),
        "voxel_size_mm": np.linalg.norm(np.asarray(affine)[:3, :3], axis=0).tolist(),
        "mu_water_per_mm": MU_WATER, "projector": projector, "recon_projector": recon_op,
        "noise": {"I0": noise, "seed": seed, "noise_norm": noise_norm} if noise else None,
        "metrics": m, "time_s": dict(st.t, total=round(sum(st.t.values()), 3)), "memory": peak_memory(),
        "device": str(dev), "torch_threads": torch.get_num_threads(),
        "scan": gdesc, "geometry": geometry.as_dict(), "reconstruction": dict(info),
        "options": options if options is not None else {}, "outputs": paths,
    }
    write_json(paths["metrics"], metrics)
    return metrics


def write_outputs(st: Stages, paths: dict, rec, truth, geometry, affine, p, info: dict, title: str, *,
                  view_labels=None, proj_aspect: float = 1.0, device=None, values: str = "hu") -> Optional[dict]:
    """Metrics over the field of view (when ``truth`` is given), the NIfTI (in HU, or μ with
    ``values="mu"``) and the figure (HU)."""
    from xwin.intensity import mu_to_hu
    from xwin.io import Volume, save_volume

    from . import filters, report

    m = None
    rec_hu = mu_to_hu(rec.cpu())
    truth_hu = None
    if truth is not None:
        fov = st.run("fov_mask", filters.fov_mask, geometry, tuple(rec.shape), affine=affine, device=device)
        m = st.run("metrics", report.image_metrics, rec, truth, fov)
        truth_hu = mu_to_hu(truth.cpu()).numpy()
    rec_out = rec_hu if values == "hu" else rec.detach().cpu()
    st.run("write_nifti", save_volume, Volume(rec_out.contiguous(), affine), paths["nifti"])
    st.run("figure", report.save_figure, paths["figure"], truth_hu, rec_hu.numpy(), affine, p.cpu().numpy(), title,
           m, residuals=info.get("residual_history"), view_labels=view_labels, proj_aspect=proj_aspect)
    return m

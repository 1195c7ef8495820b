"""Reconstructing given projections (measured, or simulated by another toolkit such as RTK):
``python -m xwin.reconstruct --projections PROJ --geometry GEOM (--like REF | --shape X Y Z --spacing S) ...``.

* PROJ: a projection stack (:func:`xwin.io.load_projections`: ``.mha``/``.mhd``, NIfTI, ``.npy``), line
  integrals, or intensities with ``i0`` (p = −log(I/I0)).
* GEOM: RTK's ``ThreeDCircularProjectionGeometry`` XML (converted with the stack's origin / spacing /
  direction, LPS -> RAS; :mod:`xwin.reconstruct.rtk`) or xwin's geometry JSON.
* The output grid: the shape and affine of ``like`` (NIfTI, DICOM or MetaImage volume), or ``shape`` with
  ``spacing`` (mm) about ``center`` (world mm; default the centre of the orbit), axis-aligned in RAS+;
  with neither, the grid of ``truth``.
* ``truth``: a volume on that grid (HU, or μ in 1/mm with ``values="mu"``) to measure PSNR/SSIM/RMSE against
  over the field of view.

Writes ``recon.nii.gz`` (HU, or μ with ``values="mu"``), ``recon.png`` and ``metrics.json`` like the
simulated run (:func:`xwin.reconstruct.pipeline.simulate_and_reconstruct`).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import numpy as np

from xwin.errors import XwinError

from .pipeline import (DEFAULT_ITERS, Stages, check_method_options, prepare_output, reconstruct_projections,
                       resolve_device, resolve_recon_projector, set_threads, write_outputs)

__all__ = ["reconstruct_measured", "grid_affine"]


def grid_affine(shape: Sequence[int], spacing, center) -> np.ndarray:
    """Axis-aligned RAS+ affine of a ``shape`` grid of ``spacing`` mm (a number or three) whose centre is
    at world ``center``."""
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64).reshape(-1), (3,)) if np.size(spacing) in (1, 3) \
        else None
    if sp is None or np.any(sp <= 0) or not np.all(np.isfinite(sp)):
        raise XwinError(f"--spacing must be one or three positive numbers (mm), got {spacing}")
    shape = np.asarray(shape, dtype=np.float64)
    aff = np.diag([*sp, 1.0])
    aff[:3, 3] = np.asarray(center, dtype=np.float64) - sp * (shape - 1) / 2
    return aff


def _grid(like, shape, spacing, center, geometry, truth_vol):
    """(shape, affine, description) of the output grid."""
    from xwin.io import XwinIOError, load_volume

    if like is not None:
        if shape is not None or spacing is not None:
            raise XwinError("give the output grid either with --like or with --shape/--spacing, not both")
        try:
            ref = load_volume(like)
        except XwinIOError as exc:
            raise XwinIOError(f"cannot read --like {like!r}: {exc}") from exc
        return tuple(ref.spatial_shape), ref.affine, {"from": str(like)}
    if shape is None:
        if truth_vol is not None and spacing is None:
            return tuple(truth_vol.spatial_shape), truth_vol.affine, {"from": "--truth"}
        raise XwinError("the output grid is missing: give --like REF.nii.gz, or --shape X Y Z with --spacing")
    if spacing is None:
        raise XwinError("--shape needs --spacing (voxel size in mm)")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise XwinError(f"--shape must be three positive sizes, got {shape}")
    if center is None:
        import warnings

        from .filters import fit_orbit

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                center = fit_orbit(geometry).center if geometry.kind == "cone" else np.zeros(3)
            except XwinError:
                center = np.zeros(3)
    return shape, grid_affine(shape, spacing, center), {"from": "--shape/--spacing/--center",
                                                         "center_mm": np.asarray(center, dtype=float).tolist()}


def reconstruct_measured(projections: str, geometry: str, *, like: Optional[str] = None,
                         shape: Optional[Sequence[int]] = None, spacing=None, center=None, method: str = "fdk",
                         i0: Optional[float] = None, pixel_size: Optional[float] = None, truth: Optional[str] = None,
                         values: str = "hu", filter: str = "ram-lak", cutoff: float = 1.0,
                         iterations: Optional[int] = None, subsets: Optional[int] = None, tv_weight: float = 1e-5,
                         projector: str = "siddon", device: str = "auto", threads: Optional[int] = None,
                         out: str = "recon_out", show: bool = False, options: Optional[dict] = None,
                         recon_projector: str = "auto", momentum: bool = False) -> dict:
    """Reconstruct the stack ``projections`` with the scan ``geometry`` (file paths; see the module notes);
    writes the outputs to ``out`` (created only once every input has been read and checked) and returns the
    metrics dict. The iterative methods use ``recon_projector`` (``auto``: Joseph on the CPU, ``projector`` on a
    GPU; see :func:`xwin.reconstruct.pipeline.resolve_recon_projector`)."""
    import torch

    from xwin.intensity import MU_WATER, hu_to_mu
    from xwin.io import XwinIOError, load_projections, load_volume

    from .report import peak_memory, write_json
    from .rtk import load_geometry

    if values not in ("hu", "mu"):
        raise XwinError(f"--values must be hu or mu, got {values!r}")
    st = Stages()
    try:
        stack = st.run("load_projections", load_projections, projections, i0=i0)
    except XwinIOError as exc:
        raise XwinIOError(f"cannot read projections {projections!r}: {exc}") from exc
    V, R, C = stack.data.shape
    check_method_options(method, views=V, subsets=subsets, cutoff=cutoff, tv_weight=tv_weight)
    g, gdesc = st.run("load_geometry", load_geometry, geometry, rows=R, cols=C,
                      index_to_physical=stack.index_to_physical, pixel_size=pixel_size)
    if g.num_views != V:
        raise XwinError(f"geometry {geometry!r} has {g.num_views} views, the projections {V}")
    truth_vol = None
    if truth is not None:
        try:
            truth_vol = st.run("load_truth", load_volume, truth)
        except XwinIOError as exc:
            raise XwinIOError(f"cannot read --truth {truth!r}: {exc}") from exc
    shape, affine, grid_desc = _grid(like, shape, spacing, center, g, truth_vol)
    mu_truth = None
    if truth_vol is not None:
        if tuple(truth_vol.spatial_shape) != tuple(shape):
            raise XwinError(f"--truth has shape {truth_vol.spatial_shape}, the output grid {tuple(shape)}")
        if not np.allclose(truth_vol.affine, affine, atol=1e-3):
            raise XwinError("--truth lies on another grid (affine) than the output: give it as --like too")
        mu_truth = truth_vol.data.float() if values == "mu" else hu_to_mu(truth_vol.data.float())
    dev = resolve_device(device)
    set_threads(threads, dev)
    recon_op = resolve_recon_projector(recon_projector, projector, dev) if method in DEFAULT_ITERS else None
    paths = prepare_output(out)                       # every input read and checked: now the folder may exist
    if show:
        print(f"xwin.reconstruct: {method.upper()} of {V} measured views ({R}x{C}, {g.kind} beam, geometry "
              f"{gdesc['format']}) onto {tuple(shape)} voxels, device {dev}", file=sys.stderr)
    p = stack.data.to(dev)
    rec, info = st.run("reconstruct", reconstruct_projections, p, g.to(dev) if dev.type == "cuda" else g, shape,
                       affine, method=method, filter=filter, cutoff=cutoff, iterations=iterations, subsets=subsets,
                       tv_weight=tv_weight, projector=projector, show=show, recon_projector=recon_projector,
                       momentum=momentum)
    title = f"{method.upper()} — {V} given {g.kind}-beam views — {stack.info['path']}"
    m = write_outputs(st, paths, rec.float(), None if mu_truth is None else mu_truth.to(dev), g, affine, p, info,
                      title, device=dev, values=values)
    metrics = {
        "method": method, "input": stack.info, "geometry_file": gdesc, "volume_shape": list(shape),
        "volume_affine": np.asarray(affine).tolist(), "grid": grid_desc,
        "voxel_size_mm": np.linalg.norm(np.asarray(affine)[:3, :3], axis=0).tolist(),
        "values": values, "mu_water_per_mm": MU_WATER, "projector": recon_op or projector, "truth": truth,
        "metrics": m, "time_s": dict(st.t, total=round(sum(st.t.values()), 3)), "memory": peak_memory(),
        "device": str(dev), "torch_threads": torch.get_num_threads(),
        "geometry": g.as_dict(), "reconstruction": dict(info), "options": options or {}, "outputs": paths,
    }
    write_json(paths["metrics"], metrics)
    return metrics

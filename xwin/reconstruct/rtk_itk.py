"""Running RTK itself (``pip install itk-rtk``, optional) on xwin's data: for the comparison tests and
``benchmarks/recon_speed.py``. Nothing in xwin's own reconstruction needs this module.

Volumes cross as :class:`xwin.io.Volume` (RAS+ affine) <-> ITK images (LPS physical space, numpy order
[k, j, i]); projection stacks as (V, rows, cols) arrays with an ITK index -> detector-coordinate frame.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from xwin.errors import XwinError
from xwin.io import Volume
from xwin.io.projections import LPS_TO_RAS

from .rtk import PARAM_ORDER, RTKGeometry

__all__ = ["require_rtk", "itk_image", "volume_from_itk", "rtk_geometry", "rtk_forward", "rtk_fdk",
           "rtk_iterative", "stack_image"]


class RTKMissingError(XwinError):
    """ITK/RTK is not installed."""


def require_rtk():
    """``(itk, itk.RTK)``; an error naming the extra to install when they are missing."""
    try:
        import itk
        from itk import RTK
    except ImportError as exc:
        raise RTKMissingError("this needs RTK's Python wheels: pip install itk-rtk") from exc
    return itk, RTK


def _set_frame(img, m: np.ndarray):
    itk, _ = require_rtk()
    n = img.GetImageDimension()
    sp = np.linalg.norm(m[:n, :n], axis=0)
    img.SetOrigin([float(x) for x in m[:n, n if n < 3 else 3]])
    img.SetSpacing([float(x) for x in sp])
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(m[:n, :n] / sp)))
    return img


def itk_image(vol: Volume):
    """The ITK float image of a volume: data transposed to [k, j, i], affine to LPS."""
    itk, _ = require_rtk()
    arr = np.ascontiguousarray(vol.data.detach().cpu().numpy().astype(np.float32).transpose(2, 1, 0))
    return _set_frame(itk.image_from_array(arr), LPS_TO_RAS @ vol.affine)


def volume_from_itk(img) -> Volume:
    """An ITK 3-D image as a :class:`Volume` (RAS+)."""
    itk, _ = require_rtk()
    arr = np.asarray(itk.array_from_image(img), dtype=np.float32).transpose(2, 1, 0)
    m = np.eye(4)
    m[:3, :3] = np.asarray(itk.array_from_matrix(img.GetDirection())) @ np.diag(np.asarray(img.GetSpacing()))
    m[:3, 3] = np.asarray(img.GetOrigin())
    return Volume(torch.from_numpy(np.ascontiguousarray(arr)), LPS_TO_RAS @ m)


def stack_image(p: np.ndarray, frame: np.ndarray):
    """An ITK image of a (V, rows, cols) stack with the ITK index -> detector-coordinate ``frame``."""
    itk, _ = require_rtk()
    return _set_frame(itk.image_from_array(np.ascontiguousarray(p, dtype=np.float32)), frame)


def rtk_geometry(g: RTKGeometry):
    """RTK's ``ThreeDCircularProjectionGeometry`` with the same nine parameters per projection."""
    _, rtk = require_rtk()
    geo = rtk.ThreeDCircularProjectionGeometry.New()
    for i in range(g.num_views):
        geo.AddProjection(*(float(getattr(g, f)[i]) for f in PARAM_ORDER))
    return geo


def _empty_stack(frame: np.ndarray, views: int, rows: int, cols: int):
    itk, rtk = require_rtk()
    img_t = itk.Image[itk.F, 3]
    src = rtk.ConstantImageSource[img_t].New()
    sp = np.linalg.norm(frame[:3, :3], axis=0)
    src.SetOrigin([float(x) for x in frame[:3, 3]])
    src.SetSpacing([float(x) for x in sp])
    src.SetDirection(itk.matrix_from_array(np.ascontiguousarray(frame[:3, :3] / sp)))
    src.SetSize([int(cols), int(rows), int(views)])
    src.SetConstant(0.0)
    return src


def rtk_forward(vol: Volume, g: RTKGeometry, frame: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """RTK's Joseph forward projection of ``vol``: (V, rows, cols) float32."""
    itk, rtk = require_rtk()
    img_t = itk.Image[itk.F, 3]
    src = _empty_stack(frame, g.num_views, rows, cols)
    fp = rtk.JosephForwardProjectionImageFilter[img_t, img_t].New()
    fp.SetInput(0, src.GetOutput())
    fp.SetInput(1, itk_image(vol))
    fp.SetGeometry(rtk_geometry(g))
    fp.Update()
    return np.asarray(itk.array_from_image(fp.GetOutput()), dtype=np.float32).copy()


def _empty_volume(like: Volume):
    itk, rtk = require_rtk()
    img_t = itk.Image[itk.F, 3]
    m = LPS_TO_RAS @ like.affine
    sp = np.linalg.norm(m[:3, :3], axis=0)
    src = rtk.ConstantImageSource[img_t].New()
    src.SetOrigin([float(x) for x in m[:3, 3]])
    src.SetSpacing([float(x) for x in sp])
    src.SetDirection(itk.matrix_from_array(np.ascontiguousarray(m[:3, :3] / sp)))
    src.SetSize([int(s) for s in like.spatial_shape])
    src.SetConstant(0.0)
    src.Update()               # the image must outlive its source (ITK images hold their source weakly)
    return src.GetOutput()


def rtk_fdk(p: np.ndarray, frame: np.ndarray, g: RTKGeometry, like: Volume, *, hann: float = 0.0) -> Volume:
    """RTK's CPU FDK (displaced-detector and Parker short-scan weighting as ``rtkfdk`` applies them) of the
    stack ``p`` on the grid of ``like``."""
    itk, rtk = require_rtk()
    img_t = itk.Image[itk.F, 3]
    geo = rtk_geometry(g)
    ddf = rtk.DisplacedDetectorImageFilter[img_t].New()
    ddf.SetInput(stack_image(p, frame))
    ddf.SetGeometry(geo)
    pssf = rtk.ParkerShortScanImageFilter[img_t].New()
    pssf.SetInput(ddf.GetOutput())
    pssf.SetGeometry(geo)
    fdk = rtk.FDKConeBeamReconstructionFilter[img_t].New()
    fdk.SetInput(0, _empty_volume(like))
    fdk.SetInput(1, pssf.GetOutput())
    fdk.SetGeometry(geo)
    if hann:
        fdk.GetRampFilter().SetHannCutFrequency(hann)
    fdk.Update()
    return volume_from_itk(fdk.GetOutput())


def rtk_iterative(method: str, p: np.ndarray, frame: np.ndarray, g: RTKGeometry, like: Volume, *,
                  iterations: int = 10, subsets: Optional[int] = None, tv_weight: float = 0.0) -> Volume:
    """RTK's SART/OS-SART (``sart``), conjugate gradient (``cg``) or ADMM-TV (``admm-tv``), Joseph projectors."""
    itk, rtk = require_rtk()
    img_t = itk.Image[itk.F, 3]
    geo = rtk_geometry(g)
    proj = stack_image(p, frame)
    init = _empty_volume(like)
    if method == "sart":
        f = rtk.SARTConeBeamReconstructionFilter[img_t, img_t].New()
        f.SetNumberOfIterations(iterations)
        f.SetNumberOfProjectionsPerSubset(max(1, g.num_views // (subsets or g.num_views)))
        f.SetLambda(0.3 if subsets is None else 0.9)
        f.SetEnforcePositivity(True)
    elif method == "cg":
        f = rtk.ConjugateGradientConeBeamReconstructionFilter[img_t].New()
        f.SetNumberOfIterations(iterations)
    elif method == "admm-tv":
        f = rtk.ADMMTotalVariationConeBeamReconstructionFilter[img_t].New()
        f.SetAlpha(tv_weight)
        f.SetBeta(1000.0)
        f.SetAL_iterations(iterations)
        f.SetCG_iterations(3)
    else:
        raise XwinError(f"unknown RTK method {method!r}")
    f.SetInput(0, init)
    f.SetInput(1, proj)
    f.SetGeometry(geo)
    f.Update()
    return volume_from_itk(f.GetOutput())

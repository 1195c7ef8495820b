"""The per-view ray record: named offsets into the 24 float64 numbers per (batch entry, view).

:func:`xwin.kernels._prep.ray_params` writes one record per view; the torch reference
(:mod:`xwin.kernels.reference`), the Triton kernels (:mod:`xwin.kernels._triton_common`, as
``tl.constexpr``), the geometry-gradient pass and the benchmarks read it through these names only.

All vectors are in *index space* (voxel (i, j, k) centre at integer coordinates, see ``_prep``):

========== ======= =================================================================================
name        offset  content
========== ======= =================================================================================
RAY_FIRST   0..2    cone beam: the source S; parallel beam: the unit world direction mapped to index
                    space, E = M⁻¹·d/|d| (so the ray parameter t is in world mm)
RAY_CENTER  3..5    detector centre C
RAY_U       6..8    one detector column step U
RAY_V       9..11   one detector row step V
RAY_M       12..20  the affine's 3×3 part M, row-major (world length of an index-space step: |M d|)
(unused)    21..23  zero
========== ======= =================================================================================
"""

RAY_FIRST = 0
RAY_CENTER = 3
RAY_U = 6
RAY_V = 9
RAY_M = 12
RAY_RECORD = 24

__all__ = ["RAY_FIRST", "RAY_CENTER", "RAY_U", "RAY_V", "RAY_M", "RAY_RECORD"]

"""Projection decoder: the view predictor's predicted patch tokens of a view -> that view's projection image.

X-WIN predicts, from the frontal radiograph of a chest, the patch tokens of its projections after 3D
rotations. To turn those predictions into a CT (issue #13) they must become images that FDK can use:
**line integrals on one scale shared by every view of a CT**. A per-view display window (what the world
model's inputs get) would give every view its own unknown gain and offset, and filtered backprojection
of such views is not the CT.

Scale. The decoder's target for view v of a CT is ``p_v / s`` where ``p_v`` are the view's line integrals
(∫μ dl, μ in 1/mm) and ``s`` is the ``scale_percentile`` (99.5th) percentile of the *frontal* view's line
integrals of the same CT. One number per CT, from the view the model is given: ratios between views are
kept exactly (tested), zero stays zero (air), and the target does not depend on the CT's absolute
attenuation scale, which the world model cannot see (its input image is normalised). At inference
``s`` comes from the input when it is known (a CT's simulated frontal view: ``--ct``) and otherwise from
the prior, the mean ``s`` of the decoder's training CTs (a real radiograph: ``--image``).

Network (:class:`ProjectionDecoder`): layer norm, linear to ``width``, fixed sin-cos position embedding,
``depth`` pre-norm transformer blocks (the world model's :class:`xwin.model.Block`), a linear map of every
token to its ``patch × patch`` pixels (MAE's decoder head), and a small residual convolutional refiner that
removes the patch seams.

Loss (:func:`decoder_loss`): L1 + ``lambda_structural`` × a structural term, by default ``1 − SSIM``
(Gaussian window σ = 1.5, fixed data range 1 on the ``p / s`` scale, never a per-image range). Why: L1 alone
regresses to the conditional median and blurs; the ramp filter of FDK amplifies exactly the high
frequencies a blurred view lacks, and the 2D quality the paper reports is SSIM. ``"gradient"`` (L1 of
finite differences) is the alternative, also implemented.

Training (:func:`train_decoder`) is a second stage after the world model: its training CTs plus phantoms
it never saw (never its or our held-out ones), its yaw grid, its encoder frozen (frontal tokens cached);
by default the view predictor g_v is tuned with the decoder on the pixel loss and stored with it
(``finetune_predictor``; measured better on held-out CTs, docs/ct_from_xray.md), else g_v is frozen too
and its predicted tokens are cached; AdamW with warm-up + cosine; a checkpoint with the optimiser,
step and RNG state every ``ckpt_every`` steps (written atomically; a restarted run resumes and continues
bit-identically, tested); loads only with ``torch.load(weights_only=True)``. :func:`train_stage` is the
call for the end of ``python -m xwin.train``: it writes ``RUN/decoder/decoder.pt`` next to
``RUN/checkpoint.pt``, where ``python -m xwin.reconstruct --from-model RUN/checkpoint.pt`` finds it.
"""

from __future__ import annotations

from .data import *  # noqa: F401,F403
from .data import __all__ as _data
from .network import *  # noqa: F401,F403
from .network import __all__ as _network
from .training import *  # noqa: F401,F403
from .training import __all__ as _training

__all__ = _network + _data + _training

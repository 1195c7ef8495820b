"""X-WIN world-model training with target projections rendered on the fly.

    python -m xwin.train --config tiny                       # embedded sample CT + phantoms + sample CXR
    python -m xwin.train --config paper --ct CT_DIR --cxr CXR_DIR --out runs/paper
    torchrun --nproc_per_node 8 -m xwin.train --config paper --ct ... --cxr ...

Every step (:func:`train_step`): draw B distinct CTs and, per CT, N actions; render the frontal context view
and the N target views with :mod:`xwin.render` on the training device; draw B real radiographs (random
resized crops) and I-JEPA block masks; encode targets with the EMA encoder; one forward of
:class:`xwin.model.XWinModel` gives all losses (:mod:`xwin.losses`); AdamW step with gradient clipping;
EMA update.

Modules: :mod:`.config` (typed, strict config), :mod:`.datasets` (CT and radiograph pools, discovery),
:mod:`.checkpoint` (atomic save, RNG state, resume check), :mod:`.step` (one step), :mod:`.loop`
(:func:`train`), :mod:`.plot`, :mod:`.cli` (``python -m xwin.train``, ``xwin-train``).

Run folder (``--out``): ``config.json``, ``metrics.jsonl`` (one JSON line per logged step),
``checkpoint.pt`` (written atomically; a run restarted with the same ``--out`` resumes exactly),
``summary.json`` and ``curve.png`` at the end.

Randomness: model initialisation from ``seed``; all data randomness (CT choice, actions, radiograph crops,
masks) from one ``torch.Generator`` per rank, seeded from (seed, rank) and saved in checkpoints.
Schedules (lr, weight decay, EMA momentum) are pure functions of the step.
"""

from .checkpoint import ResumeError
from .cli import main
from .config import CONFIG_DIR, ConfigError, DataConfig, LossConfig, OptimConfig, TrainConfig, ValConfig, load_config
from .datasets import CTPool, DataSourceError, RadiographPool, discover_cts, discover_radiographs
from .loop import train
from .plot import plot_run
from .schedules import lr_at, momentum_at, param_groups, wd_at
from .step import TrainState, train_step

_param_groups = param_groups  # the name the tests (and older code) use

__all__ = ["main", "train", "train_step", "TrainState", "load_config", "TrainConfig", "DataConfig", "LossConfig",
           "OptimConfig", "ValConfig", "ConfigError", "ResumeError", "DataSourceError", "CTPool", "RadiographPool",
           "discover_cts", "discover_radiographs", "lr_at", "wd_at", "momentum_at", "param_groups", "plot_run",
           "CONFIG_DIR"]

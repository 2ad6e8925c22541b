"""Frozen dataclass configuration of a LADA run.

Every hyperparameter of section 2 of the method page (``lada_method.md``) is a field here.
Parameter names are dotted paths (``lada.memory_size``, ``optim.lr``): the same names are used by
``--set``, by the YAML config files and by the search spaces of the sweep layer.

Precedence: defaults < ``--config`` YAML < search-space sample < ``--set`` (see :func:`build_config`).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

VARIANTS = ("adapter_only", "adapter_replay", "adapter_units", "full")
"""The paper's ablations (Table 4): text AdaptFormer only, + Gaussian replay, + memory units, full."""


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line meant for the user."""


@dataclass(frozen=True)
class BackboneConfig:
    """Which open_clip model to load (see :mod:`lada_core.backbone`)."""

    model: str = "ViT-B-16-quickgelu"  # OpenAI's ViT-B/16 with its QuickGELU (method page, section 2)
    pretrained: str | None = "openai"  # an open_clip tag, a local checkpoint path, or None (random)
    model_config_dir: str | None = None  # extra JSON model configs to register (the tests' tiny models)
    template: str = "a photo of a {}."


@dataclass(frozen=True)
class DataConfig:
    """The task sequence and its feature cache."""

    benchmark: str = "mini-tail"
    data_root: str | None = None
    shots: int | None = 16  # None = full-shot
    views: int = 10  # augmented views cached per training image (plus one test-transform view)
    cache_root: str = "lada_cache"
    encode_batch_size: int = 256
    shard_rows: int = 8192  # rows per Parquet shard (bounds memory during extraction)
    device: str = "auto"  # for encoding: auto | cpu | cuda | cuda:N
    # How few-shot images are drawn: "authors" (Python's random seeded 0 in each task, CoOp's rule, as
    # the authors' code; X-TAIL and user sequences) or "seeded" (NumPy seeded with sample_seed).
    sample_rule: Literal["authors", "seeded"] = "authors"
    sample_seed: int = 1  # few-shot sampling seed of the "seeded" rule (and of mini-tail), validation draws
    # Validation split (tuning never sees test data): at most this many images per class, from the
    # dataset's own val list, else held out of the training pool (val_fraction of a class at most).
    val_per_class: int = 10
    val_fraction: float = 0.1
    exact: bool = False  # run the frozen image encoder inside the training loop (no feature cache)


@dataclass(frozen=True)
class LadaConfig:
    """Method hyperparameters (method page, section 2)."""

    memory_size: int = 16  # lambda1: memory units per class
    gaussian_components: int = 4  # lambda2: spherical Gaussian components per class
    distill_weight: float = 64.0  # gamma: weight coefficient of replayed prototypes
    alpha: float = 1.0  # weight of the LADA logits
    beta: float = 1.0  # kernel sharpness
    tau: float = 100.0  # logit scale (exp(logit_scale) of CLIP), a constant
    variant: Literal["adapter_only", "adapter_replay", "adapter_units", "full"] = "full"
    adapter_bottleneck: int = 16
    adapter_residual: float = 0.1
    kmeans_n_init: int = 10
    # random_state of the k-means (section 3) and of the Gaussian mixtures (section 5): the authors fix
    # it at 42, whatever the run's seed (train.seed drives the adapters, batches and replay noise).
    cluster_seed: int = 42
    # OPEN (method page, section 4): "mean" = mean over the batch of w * CE (the reference code);
    # "weight_sum" = sum of w * CE divided by the sum of w.
    loss_reduction: Literal["mean", "weight_sum"] = "mean"
    # Inference (section 6): False = "without selector" (the reported numbers).
    selector: bool = False

    @property
    def use_replay(self) -> bool:
        return self.variant in ("adapter_replay", "full")

    @property
    def use_units(self) -> bool:
        return self.variant in ("adapter_units", "full")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + OneCycleLR stepped every batch (method page, section 2)."""

    lr: float = 1e-3
    weight_decay: float = 5e-4
    batch_size: int = 64
    epochs: int | None = None  # None = the benchmark's per-task schedule
    epochs_scale: float = 1.0  # multiply the schedule (e.g. 0.1 for a quick look)
    amp: bool = True  # mixed precision (bfloat16 autocast) on GPU; ignored on CPU


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_batch_size: int = 1024


@dataclass(frozen=True)
class EvalConfig:
    """Which split fills the accuracy matrix. ``test`` (default): what the paper reports, as
    ``lada-train`` does. ``val``: the validation split (what a sweep tunes on; Cha & Cho, "Hyperparameters
    in Continual Learning: A Reality Check", TMLR 2025): the test split is then neither encoded nor read."""

    split: Literal["val", "test"] = "test"
    peek_test: bool = False  # with split=val: also score test after every task, as test/... metrics (exploration only)


@dataclass(frozen=True)
class Config:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lada: LadaConfig = field(default_factory=LadaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"lada.memory_size": 16, ...}``: the dotted parameter names and their values."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out

    def validate(self) -> Config:
        """Range checks that types alone cannot express; raises :class:`ConfigError`."""
        checks = [
            (self.lada.memory_size >= 1, "lada.memory_size (lambda1) must be >= 1"),
            (self.lada.gaussian_components >= 1, "lada.gaussian_components (lambda2) must be >= 1"),
            (self.lada.distill_weight >= 0, "lada.distill_weight (gamma) must be >= 0"),
            (self.lada.beta > 0, "lada.beta must be > 0"),
            (self.lada.tau > 0, "lada.tau must be > 0"),
            (self.lada.adapter_bottleneck >= 1, "lada.adapter_bottleneck must be >= 1"),
            (self.lada.kmeans_n_init >= 1, "lada.kmeans_n_init must be >= 1"),
            (0 <= self.lada.cluster_seed < 2**32, "lada.cluster_seed must be in [0, 2**32)"),
            (self.optim.lr > 0, "optim.lr must be > 0"),
            (self.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (self.optim.batch_size >= 1, "optim.batch_size must be >= 1"),
            (self.optim.epochs is None or self.optim.epochs >= 1, "optim.epochs must be >= 1"),
            (self.optim.epochs_scale > 0, "optim.epochs_scale must be > 0"),
            (self.data.shots is None or self.data.shots >= 1, "data.shots must be >= 1 (or null for full-shot)"),
            (self.data.views >= 0, "data.views must be >= 0"),
            (self.data.val_per_class >= 0, "data.val_per_class must be >= 0 (0: no validation split)"),
            (0 <= self.data.val_fraction < 1, "data.val_fraction must be in [0, 1)"),
            (self.data.encode_batch_size >= 1, "data.encode_batch_size must be >= 1"),
            (self.data.shard_rows >= 1, "data.shard_rows must be >= 1"),
            (self.train.eval_batch_size >= 1, "train.eval_batch_size must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


SECTIONS: dict[str, type] = {
    "backbone": BackboneConfig,
    "data": DataConfig,
    "lada": LadaConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


INT_LIMIT = 2**63  # integers must fit in 64 bits (what torch and numpy take; beyond is a typo)


def _show(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for a one-line message: never raises (huge ints), cut to ``limit`` characters."""
    try:
        text = repr(value)
    except Exception:  # e.g. an int beyond sys.get_int_max_str_digits()
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _line(text: str, limit: int = 160) -> str:
    """``text`` as one line of at most ``limit`` characters (for messages of other libraries)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parameter_names() -> list[str]:
    """Every dotted parameter name a config accepts."""
    return [f"{s}.{k}" for s, cls in SECTIONS.items() for k in _field_types(cls)]


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats. One-line errors."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {_show(value)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name}: expected one of {', '.join(map(str, choices))}; got {_show(value)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {_show(value)}")
    if tp is int:
        out_int: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            out_int = value
        elif isinstance(value, float) and value.is_integer():
            out_int = int(value)
        if out_int is None:
            raise ConfigError(f"{name}: expected an integer, got {_show(value)}")
        if not -INT_LIMIT < out_int < INT_LIMIT:
            raise ConfigError(f"{name}: {_show(value)} is out of range (integers must fit in 64 bits)")
        return out_int
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                out = float(value)
            except OverflowError:  # an int beyond the float range
                out = float("inf")
            if out != out or out in (float("inf"), float("-inf")):
                raise ConfigError(f"{name}: expected a finite number, got {_show(value)}")
            return out
        raise ConfigError(f"{name}: expected a number, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {_show(value)}")
    raise ConfigError(f"{name}: unsupported type {tp!r}")  # pragma: no cover - programming error


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(map(str, get_args(tp)))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def from_dict(data: Mapping[str, Any] | None, base: Config | None = None) -> Config:
    """Build a :class:`Config` from a nested dict (``{"lada": {"memory_size": 8}}``) and/or dotted keys
    (``{"lada.memory_size": 8}``) on top of ``base``. Unknown keys and wrong types raise ConfigError."""
    base = base or Config()
    if data is None:
        return base.validate()
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"config keys must be strings, got {_show(key)}")
        if "." in key:
            flat[key] = value
        elif key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a mapping of settings, got {_show(value)}")
            for sub, v in value.items():
                if not isinstance(sub, str):
                    raise ConfigError(f"{key}: setting names must be strings, got {_show(sub)}")
                flat[f"{key}.{sub}"] = v
        else:
            raise ConfigError(f"unknown config section {_show(key)} (valid: {', '.join(SECTIONS)})")
    return _apply_flat(base, flat)


def _apply_flat(base: Config, flat: Mapping[str, Any]) -> Config:
    updates: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, _, name = str(key).partition(".")
        if section not in SECTIONS:
            raise ConfigError(f"unknown config key {_show(key)} (sections: {', '.join(SECTIONS)})")
        types_ = _field_types(SECTIONS[section])
        if name not in types_:
            raise ConfigError(f"unknown config key {_show(key)} (valid in {section}: {', '.join(types_)})")
        updates.setdefault(section, {})[name] = _coerce(key, value, types_[name])
    sections = {s: dataclasses.replace(getattr(base, s), **u) for s, u in updates.items()}
    return dataclasses.replace(base, **sections).validate()


def parse_set(item: str) -> tuple[str, Any]:
    """Parse one ``--set key=value``; the value is read as YAML (``8``, ``1e-3``, ``true``, ``null``)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {_show(item)}")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {_show(item)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError):
        # not YAML (or a tag like "!!float abc", an int of thousands of digits, deep nesting): the
        # text itself, which the field's type check then accepts or rejects in one line
        value = raw
    if isinstance(value, (dict, list, set, tuple)):
        shown = key if key.isprintable() and len(key) <= 80 else _show(key)
        raise ConfigError(f"--set {shown}: expected a single value, got {_show(raw)}")
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            value = int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            pass
    # Strings that YAML reads as numbers but whose field is a string (a model name like "1e3") are
    # handled by _coerce failing; keep the raw text available for str fields.
    section, _, name = key.partition(".")
    if section in SECTIONS:
        tp = _field_types(SECTIONS[section]).get(name)
        if tp is not None and _accepts_str(tp) and not isinstance(value, str) and value is not None:
            if not _accepts(tp, value):
                value = raw
    return key, value


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) in (typing.Union, types.UnionType):
        return str in get_args(tp)
    return False


def _accepts(tp: Any, value: Any) -> bool:
    try:
        _coerce("x", value, tp)
        return True
    except ConfigError:
        return False


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file; a missing file or malformed YAML is a ConfigError."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "malformed YAML"
        raise ConfigError(f"{p}: malformed YAML ({_line(first)})") from None
    except RecursionError:
        raise ConfigError(f"{p}: malformed YAML (nested too deeply)") from None
    except (ValueError, OverflowError) as exc:  # a constructor refused a value: "!!float abc", a 5000-digit int
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{p}: malformed YAML ({_line(first)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file must hold a mapping of sections")
    return data


def build_config(
    config_path: str | Path | None = None,
    sample: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    base: Config | None = None,
) -> Config:
    """Defaults < YAML file < search-space sample (dotted keys) < ``--set`` strings."""
    cfg = base or Config()
    if config_path is not None:
        cfg = from_dict(load_yaml(config_path), cfg)
    if sample:
        cfg = from_dict(dict(sample), cfg)
    if overrides:
        cfg = from_dict(dict(parse_set(o) for o in overrides), cfg)
    return cfg.validate()


def config_to_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_hash(cfg: Config) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

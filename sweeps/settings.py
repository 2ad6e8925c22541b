"""A sweep's settings: resolved once from the flags (or, on ``--resume``, from its ``sweep.json``),
frozen afterwards; what may change between two drivers of one sweep is in :class:`RunOptions`.

:func:`resolve` turns parsed flags into :class:`Settings`; on ``--resume`` the flags that define the
sweep (:data:`IDENTITY`) must match the stored ones. The driver fills in what it learns later (the
cache, the number of tasks, the parent run) with :func:`dataclasses.replace` and saves the result
(:func:`save_settings`). :meth:`Settings.base_config` and :meth:`Settings.trial_spec` assemble a
trial's config the one way every reader of a sweep uses.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SWEEP_FILE = "sweep.json"
BEST_CONFIG = "best_config.yaml"
SUMMARY_FILE = "summary.json"
DEFAULT_STORAGE = "sweep_results"
TINY_MODEL = "lada-tiny"  # the random-init model lada_core ships (lada_core/data/models)
DEFAULT_EXPERIMENT = "lada-sweeps"

# Settings that define a sweep: on --resume they come from sweep.json and may not change.
FINAL_MD = "final_report.md"
"""The final evaluation's table (``lada-sweep-evaluate``), in the sweep's folder and on its parent run."""

IDENTITY = (
    "space", "benchmark", "data_root", "num_samples", "metric", "scheduler", "grace_period",
    "reduction_factor", "gpus_per_trial", "cpus_per_trial", "seed", "config", "set", "study_storage",
    "mlflow_uri", "experiment", "tiny_model", "point", "peek_test",
)


class UsageError(ValueError):
    """Bad input found before the sweep starts (one-line message, exit code 2)."""


@dataclass(frozen=True)
class Settings:
    """The resolved settings of a sweep (stored in ``<storage>/<name>/sweep.json``)."""

    name: str
    space: str
    benchmark: str | None
    data_root: str | None
    num_samples: int
    metric: str
    mode: str
    scheduler: str
    grace_period: int
    reduction_factor: float
    gpus_per_trial: float | None
    cpus_per_trial: float
    seed: int
    config: str | None
    set: tuple[str, ...]
    storage: str
    study_storage: str
    mlflow_uri: str
    experiment: str
    tiny_model: bool = False
    point: tuple[str, ...] = ()
    peek_test: bool = False  # --peek-test: trial runs also get test/... metrics (selection stays on val/)
    parent_run_id: str | None = None
    cache_key: str | None = None
    cache_path: str | None = None
    num_tasks: int | None = None
    dataset_names: tuple[str, ...] = ()
    created: float = 0.0

    def __post_init__(self) -> None:
        for name in ("set", "point", "dataset_names"):  # sweep.json holds lists
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))

    @property
    def folder(self) -> str:
        return join_path(self.storage, self.name)

    def base_config(self) -> Any:
        """defaults < --config < space BASE < flags (benchmark, data root, seed); ``--set`` comes later."""
        return base_config(self)

    def trial_spec(self, **fields: Any) -> Any:
        """The :class:`~sweeps.trainable.TrialSpec` of this sweep's trials (``fields``: the rest)."""
        from sweeps.trainable import TrialSpec

        return TrialSpec(base_config=self.base_config().to_dict(), overrides=tuple(self.set), **fields)


@dataclass(frozen=True)
class RunOptions:
    """What one driver of a sweep may choose anew (also on ``--resume``): where it runs and how."""

    resume: bool = False
    address: str | None = None
    local_cpus: int | None = None
    local_gpus: int | None = None
    encode_on: str = "driver"
    verbose: int = 0
    max_concurrent: int = 0
    max_failures: int = 2
    time_budget_s: float | None = None
    reuse_actors: bool = True
    t0: float = 0.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        return cls(
            resume=bool(args.resume), address=args.address, local_cpus=args.local_cpus, local_gpus=args.local_gpus,
            encode_on=args.encode_on, verbose=args.verbose, max_concurrent=args.max_concurrent or 0,
            max_failures=args.max_failures, time_budget_s=args.time_budget_s,
            reuse_actors=not getattr(args, "no_reuse_actors", False), t0=getattr(args, "t0", None) or time.time(),
        )


def default_tracking_uri(folder: str | Path | None = None) -> str:
    """A sqlite store in the working folder (MLflow 3's default file name)."""
    return f"sqlite:///{(Path(folder or Path.cwd()) / 'mlflow.db').resolve()}"


def is_uri(path: str) -> bool:
    return "://" in path


def join_path(base: str, *parts: str) -> str:
    if is_uri(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def read_text(path: str) -> str | None:
    """A small file of a local folder or a cloud URI; None when it does not exist or cannot be read."""
    import pyarrow.fs as pafs

    fs, p = pafs.FileSystem.from_uri(path) if is_uri(path) else (pafs.LocalFileSystem(), str(Path(path).resolve()))
    try:
        with fs.open_input_stream(p) as f:
            return f.read().decode()  # type: ignore[no-any-return]
    except (FileNotFoundError, OSError):
        return None


def write_text(path: str, text: str) -> None:
    """Write a small file (a local one to a temporary name, renamed into place)."""
    import pyarrow.fs as pafs

    if is_uri(path):
        fs, p = pafs.FileSystem.from_uri(path)
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(p) as f:
            f.write(text.encode())
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def load_settings(storage: str, name: str) -> Settings | None:
    """The stored settings of sweep ``name`` (None when there are none), with ``storage`` as given
    (a results folder moved or mounted elsewhere keeps working)."""
    text = read_text(join_path(storage, name, SWEEP_FILE))
    if text is None:
        return None
    data = json.loads(text)
    known = set(Settings.__dataclass_fields__)
    return Settings(**{**{k: v for k, v in data.items() if k in known}, "storage": storage})


def save_settings(s: Settings) -> None:
    write_text(join_path(s.folder, SWEEP_FILE), json.dumps(asdict(s), indent=2))


def storage_root(storage: str) -> str:
    """``--storage`` as the sweep keeps it: a cloud URI as given, a local folder absolute."""
    return storage if is_uri(storage) else str(Path(storage).resolve())


def resolve(args: argparse.Namespace) -> Settings:
    """Turn the parsed flags (and, on --resume, the stored sweep) into :class:`Settings`."""
    storage = storage_root(args.storage)
    if args.resume:
        return _resumed(args, storage)
    from search_spaces import get_space
    from sweeps.objective import parse_metric

    space = get_space(args.space or "lada_smoke")
    metric = args.metric or space.metric
    parse_metric(metric)
    num_samples = args.num_samples if args.num_samples is not None else space.num_samples
    if num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {num_samples}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bench_label = (args.benchmark or space.base.get("data.benchmark") or "default").replace("/", "_").replace(".", "_")
    name = args.name or f"{space.name}-{bench_label}-{stamp}"
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"--name {name!r}: a sweep name is a plain folder name")
    return Settings(
        name=name,
        space=space.name,
        benchmark=args.benchmark,
        data_root=str(Path(args.data_root).resolve()) if args.data_root and not is_uri(args.data_root) else args.data_root,
        num_samples=num_samples,
        metric=metric,
        mode=space.mode,
        scheduler=args.scheduler or space.scheduler,
        grace_period=args.grace_period if args.grace_period is not None else 1,
        reduction_factor=args.reduction_factor if args.reduction_factor is not None else 2.0,
        gpus_per_trial=args.gpus_per_trial,
        cpus_per_trial=args.cpus_per_trial if args.cpus_per_trial is not None else 1.0,
        seed=args.seed if args.seed is not None else 0,
        config=str(Path(args.config).resolve()) if args.config else None,
        set=tuple(args.set or ()),
        storage=storage,
        study_storage=args.study_storage or _default_study_storage(storage, name),
        mlflow_uri=args.mlflow_uri or default_tracking_uri(),
        experiment=args.experiment or DEFAULT_EXPERIMENT,
        tiny_model=bool(args.tiny_model),
        point=tuple(args.point or ()),
        peek_test=bool(getattr(args, "peek_test", False)),
        created=time.time(),
    )


def _default_study_storage(storage: str, name: str) -> str:
    from sweeps.optuna_storage import storage_url_for

    if is_uri(storage):  # a local file: sqlite cannot live on a cloud URI
        return storage_url_for(Path(DEFAULT_STORAGE, "studies", name).resolve())
    return storage_url_for(join_path(storage, name))


def _resumed(args: argparse.Namespace, storage: str) -> Settings:
    """``--resume``: the stored settings; a flag that defines the sweep may not differ from them."""
    if not args.name:
        raise UsageError("--resume needs --name (the sweep to continue)")
    stored = load_settings(storage, args.name)
    if stored is None:
        raise UsageError(f"--resume: no sweep {args.name!r} in {storage} (no {SWEEP_FILE}); start it without --resume")
    for key in IDENTITY:
        given = getattr(args, key, None)
        have = getattr(stored, key)
        if isinstance(given, list):
            given = tuple(given)
        if given is not None and given != have and not (key == "config" and given and have and Path(str(given)).resolve() == Path(str(have))):
            shown = list(given) if isinstance(given, tuple) else given
            had = list(have) if isinstance(have, tuple) else have
            raise UsageError(f"--resume: --{key.replace('_', '-')} {shown!r} differs from the sweep's {had!r}; a resumed sweep keeps its settings")
    return stored


def base_config(s: Settings) -> Any:
    """defaults < --config < space BASE < CLI flags (benchmark, data root, seed); ``--set`` comes later.
    Paths are made absolute: trials run in other processes, other folders, maybe other nodes."""
    from lada_core.config import build_config, from_dict
    from search_spaces import get_space

    space = get_space(s.space)
    # Honest tuning (Cha & Cho, TMLR 2025): every trial is scored on the validation split; the test
    # split is neither encoded nor opened unless --peek-test asks for test/... metrics beside.
    flags: dict[str, Any] = {**space.base, "train.seed": s.seed, "eval.split": "val", "eval.peek_test": s.peek_test}
    if s.benchmark:
        flags["data.benchmark"] = s.benchmark
    if s.data_root:
        flags["data.data_root"] = s.data_root
    if s.tiny_model:
        flags.update({"backbone.model": TINY_MODEL, "backbone.pretrained": None, "backbone.model_config_dir": None})
    cfg = build_config(s.config, sample=flags)
    fixes: dict[str, Any] = {}
    if not is_uri(cfg.data.cache_root):
        fixes["data.cache_root"] = str(Path(cfg.data.cache_root).expanduser().resolve())
    if cfg.backbone.model_config_dir:
        fixes["backbone.model_config_dir"] = str(Path(cfg.backbone.model_config_dir).expanduser().resolve())
    return from_dict(fixes, cfg) if fixes else cfg

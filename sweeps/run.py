"""``lada-sweep``: a sweep of LADA settings with Ray Tune, Optuna and MLflow.

Offline demo on one machine (a local Ray, a sqlite MLflow store in the working folder)::

    lada-sweep --space lada_smoke
    mlflow ui --backend-store-uri sqlite:///mlflow.db

On a cluster (``ray up ray_cluster.yaml``; then on the head node)::

    lada-sweep --address auto --space lada_full --benchmark xtail --data-root /mnt/shared/data \\
        --storage /mnt/shared/sweeps --gpus-per-trial 0.25 --scheduler asha --num-samples 64

Order of work: check every input (space, metric, benchmark, ``--set``, resources, the Ray address)
and fail with one clear line before anything runs; build or find the feature cache once; open the
parent MLflow run and the Optuna study (next to the results); run the trials; write the best config.
``--resume`` continues a sweep whose driver was stopped, with its study, results and MLflow runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # `python sweeps/run.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SWEEP_FILE = "sweep.json"
BEST_CONFIG = "best_config.yaml"
SUMMARY_FILE = "summary.json"
DEFAULT_STORAGE = "sweep_results"
TINY_MODEL = "lada-tiny"  # the random-init model lada_core ships (lada_core/data/models)

# Settings that define a sweep: on --resume they come from sweep.json and may not change.
IDENTITY = (
    "space", "benchmark", "data_root", "num_samples", "metric", "scheduler", "grace_period",
    "reduction_factor", "gpus_per_trial", "cpus_per_trial", "seed", "config", "set", "study_storage",
    "mlflow_uri", "experiment", "tiny_model", "point",
)


class UsageError(ValueError):
    """Bad input found before the sweep starts (one-line message, exit code 2)."""


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to a flag's help unless the help already says its default, or there is
    none to say (None, False: the flag's absence)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from search_spaces import space_names

    p = argparse.ArgumentParser(
        prog="lada-sweep",
        description="Sweep LADA settings: Ray Tune runs the trials, Optuna chooses the settings, MLflow records every task step.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("what to search")
    g.add_argument("--space", default=None, help=f"search space (one of: {', '.join(space_names())}; default lada_smoke)")
    g.add_argument("--benchmark", default=None, help="task sequence: mini-tail, xtail, xtail-order2 or a benchmark .yaml file (default: the space's or the config's)")
    g.add_argument("--data-root", default=None, help="folder holding the benchmark's datasets (X-TAIL: the CoOp layout)")
    g.add_argument("--num-samples", type=int, default=None, help="number of trials (default: the space's)")
    g.add_argument("--metric", default=None, help="objective: transfer, average, last, or a weighted mix like last=0.5,average=0.5 (default: the space's)")
    g.add_argument("--seed", type=int, default=None, help="seed of the Optuna sampler and of every trial's training (train.seed); default 0")
    g.add_argument("--config", default=None, help="a lada-train YAML config to start from")
    g.add_argument("--tiny-model", action="store_true", default=None, help="use the small random-init model lada_core ships (lada-tiny): an offline demo of any space")
    g.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", help="override a config value (repeatable), e.g. --set optim.epochs_scale=0.5")
    g.add_argument("--point", action="append", default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                   help="evaluate this point of the space right after the space's own first points, before the sampler's (repeatable), "
                        "e.g. --point optim.lr=3e-3,lada.memory_size=8; every name must be one the space suggests, the others keep being sampled")
    g = p.add_argument_group("scheduling")
    g.add_argument("--scheduler", choices=("fifo", "asha"), default=None, help="fifo runs every trial to its last task; asha stops trials that are weak after a task (default: the space's)")
    g.add_argument("--grace-period", type=int, default=None, help="ASHA: tasks every trial runs before it can be stopped (default 1)")
    g.add_argument("--reduction-factor", type=float, default=None, help="ASHA: keep the best 1/factor at each rung (default 2)")
    g.add_argument("--gpus-per-trial", type=float, default=None, help="GPUs per trial; a fraction packs trials on one GPU, N > 1 runs the trial data-parallel on N GPUs (default: 1 if the cluster has GPUs, else 0)")
    g.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs per trial (default 1)")
    g.add_argument("--max-concurrent", type=int, default=0, help="at most this many trials at once (0: as many as the resources allow)")
    g.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial, each from its last finished task")
    g.add_argument("--time-budget-s", type=float, default=None, help="stop the sweep after this many seconds")
    g.add_argument("--no-reuse-actors", action="store_true",
                   help="start a fresh worker process for every trial (each one then imports torch and open_clip and builds the model again); "
                        "by default a worker runs the node's next trial")
    g = p.add_argument_group("where it runs and what it keeps")
    g.add_argument("--address", default=None, help="a running Ray cluster (host:port, or auto); default: start a local Ray")
    g.add_argument("--local-cpus", type=int, default=None, help="CPUs of the local Ray started without --address (default: all)")
    g.add_argument("--local-gpus", type=int, default=None, help="GPUs of the local Ray (default: the visible ones); logical GPUs are possible for tests")
    g.add_argument("--storage", default=DEFAULT_STORAGE, help="trial results and checkpoints: a local or shared folder, or a cloud URI (s3://, gs://)")
    g.add_argument("--study-storage", default=None, help="Optuna storage URL (default: sqlite optuna.db next to the results; a local file when --storage is a cloud URI)")
    g.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db in the working folder)")
    g.add_argument("--experiment", default=None, help="MLflow experiment of the parent run (default lada-sweeps)")
    g.add_argument("--name", default=None, help="sweep name: the results folder, the Optuna study and the parent run (default <space>-<benchmark>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the sweep --name after its driver stopped: same study, results and MLflow runs")
    g.add_argument("--encode-on", choices=("driver", "ray"), default="driver", help="build the feature cache in the driver, or fan it out as Ray tasks (one per shard)")
    g.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Ray Tune's console output")
    return p


@dataclass
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
    set: list[str]
    storage: str
    study_storage: str
    mlflow_uri: str
    experiment: str
    tiny_model: bool = False
    point: list[str] = field(default_factory=list)
    parent_run_id: str | None = None
    cache_key: str | None = None
    cache_path: str | None = None
    num_tasks: int | None = None
    dataset_names: list[str] = field(default_factory=list)
    created: float = 0.0

    @property
    def folder(self) -> str:
        return join_path(self.storage, self.name)


def is_uri(path: str) -> bool:
    return "://" in path


def join_path(base: str, *parts: str) -> str:
    if is_uri(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def _read_text(path: str) -> str | None:
    import pyarrow.fs as pafs

    fs, p = pafs.FileSystem.from_uri(path) if is_uri(path) else (pafs.LocalFileSystem(), str(Path(path).resolve()))
    try:
        with fs.open_input_stream(p) as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


def _write_text(path: str, text: str) -> None:
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
    text = _read_text(join_path(storage, name, SWEEP_FILE))
    if text is None:
        return None
    data = json.loads(text)
    known = {f for f in Settings.__dataclass_fields__}
    return Settings(**{k: v for k, v in data.items() if k in known})


def save_settings(s: Settings) -> None:
    _write_text(join_path(s.folder, SWEEP_FILE), json.dumps(asdict(s), indent=2))


def _address_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an address nothing listens on (ray.init would retry for a long time)."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address!r}: expected host:port (the head node's GCS port, default 6379) or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UsageError(f"--address {address}: no Ray cluster reachable there ({exc.strerror or exc}); start one with 'ray start --head' or 'ray up ray_cluster.yaml'") from None


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Turn the parsed flags (and, on --resume, the stored sweep) into :class:`Settings`."""
    from search_spaces import get_space
    from sweeps.objective import parse_metric
    from sweeps.search import storage_url_for

    storage = args.storage if is_uri(args.storage) else str(Path(args.storage).resolve())
    if args.resume:
        if not args.name:
            raise UsageError("--resume needs --name (the sweep to continue)")
        stored = load_settings(storage, args.name)
        if stored is None:
            raise UsageError(f"--resume: no sweep {args.name!r} in {storage} (no {SWEEP_FILE}); start it without --resume")
        for key in IDENTITY:
            given = getattr(args, key, None)
            have = getattr(stored, key)
            if given is not None and given != have and not (key == "config" and given and have and Path(given).resolve() == Path(have)):
                raise UsageError(f"--resume: --{key.replace('_', '-')} {given!r} differs from the sweep's {have!r}; a resumed sweep keeps its settings")
        stored.storage = storage
        return stored

    space = get_space(args.space or "lada_smoke")
    metric = args.metric or space.metric
    parse_metric(metric)
    num_samples = args.num_samples if args.num_samples is not None else space.num_samples
    if num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {num_samples}")
    scheduler = args.scheduler or space.scheduler
    benchmark = args.benchmark
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bench_label = (benchmark or space.base.get("data.benchmark") or "default").replace("/", "_").replace(".", "_")
    name = args.name or f"{space.name}-{bench_label}-{stamp}"
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"--name {name!r}: a sweep name is a plain folder name")
    folder = join_path(storage, name)
    if args.study_storage:
        study_storage = args.study_storage
    elif is_uri(storage):
        study_storage = storage_url_for(Path(DEFAULT_STORAGE, "studies", name).resolve())
    else:
        study_storage = storage_url_for(folder)
    from sweeps.tracking import DEFAULT_EXPERIMENT, default_tracking_uri

    return Settings(
        name=name,
        space=space.name,
        benchmark=benchmark,
        data_root=str(Path(args.data_root).resolve()) if args.data_root and not is_uri(args.data_root) else args.data_root,
        num_samples=num_samples,
        metric=metric,
        mode=space.mode,
        scheduler=scheduler,
        grace_period=args.grace_period if args.grace_period is not None else 1,
        reduction_factor=args.reduction_factor if args.reduction_factor is not None else 2.0,
        gpus_per_trial=args.gpus_per_trial,
        cpus_per_trial=args.cpus_per_trial if args.cpus_per_trial is not None else 1.0,
        seed=args.seed if args.seed is not None else 0,
        config=str(Path(args.config).resolve()) if args.config else None,
        set=list(args.set or []),
        storage=storage,
        study_storage=study_storage,
        mlflow_uri=args.mlflow_uri or default_tracking_uri(),
        experiment=args.experiment or DEFAULT_EXPERIMENT,
        tiny_model=bool(args.tiny_model),
        point=list(args.point or []),
        created=time.time(),
    )


def base_config(s: Settings) -> Any:
    """defaults < --config < space BASE < CLI flags (benchmark, data root, seed); ``--set`` comes later."""
    from lada_core.config import build_config
    from search_spaces import get_space

    space = get_space(s.space)
    flags: dict[str, Any] = {**space.base, "train.seed": s.seed}
    if s.benchmark:
        flags["data.benchmark"] = s.benchmark
    if s.data_root:
        flags["data.data_root"] = s.data_root
    if s.tiny_model:
        flags.update({"backbone.model": TINY_MODEL, "backbone.pretrained": None, "backbone.model_config_dir": None})
    cfg = build_config(s.config, sample=flags)
    # Absolute paths: trials run in other processes, other folders, maybe other nodes.
    from lada_core.config import from_dict

    fixes: dict[str, Any] = {}
    if not is_uri(cfg.data.cache_root):
        fixes["data.cache_root"] = str(Path(cfg.data.cache_root).expanduser().resolve())
    if cfg.backbone.model_config_dir:
        fixes["backbone.model_config_dir"] = str(Path(cfg.backbone.model_config_dir).expanduser().resolve())
    return from_dict(fixes, cfg) if fixes else cfg


def parse_points(items: Sequence[str], suggested: Sequence[str], spec: Any) -> list[dict[str, Any]]:
    """``--point`` strings (``KEY=VALUE[,KEY=VALUE]``) -> points for Optuna's queue. Every name must be
    one the space suggests; values are typed by the config (``1e-3`` -> float, ``8`` -> int) and must
    give a valid config. Raises :class:`UsageError` / ``ConfigError`` with one line."""
    from lada_core.config import ConfigError, parse_set

    points = []
    for item in items:
        shown = item if len(item) <= 120 and item.isprintable() else repr(item[:120])
        point: dict[str, Any] = {}
        for part in (x.strip() for x in item.split(",")):
            if not part:
                continue
            try:
                key, value = parse_set(part)
            except ConfigError as exc:
                raise UsageError(f"--point {shown}: {str(exc).replace('--set ', '')}") from None
            if key not in suggested:
                names = ", ".join(suggested) or "none"
                key_shown = key if len(key) <= 80 and key.isprintable() else repr(key[:80])
                raise UsageError(f"--point {shown}: {key_shown} is not a parameter of the space (it suggests: {names}); use --set for fixed settings")
            if key in point:
                raise UsageError(f"--point {shown}: {key} is given twice")
            point[key] = value
        if not point:
            raise UsageError(f"--point {shown}: expected KEY=VALUE[,KEY=VALUE]")
        try:
            flat = spec.config(point).flat()
        except ConfigError as exc:
            raise UsageError(f"--point {shown}: {exc}") from None
        points.append({k: flat[k] for k in point})
    return points


def suggested_names(space: Any, seed: int = 0) -> list[str]:
    """The parameter names a space suggests (from one sample of a throwaway study)."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    finally:
        optuna.logging.set_verbosity(level)
    names: set[str] = set()
    for _ in range(16):  # a conditional space suggests different names on different branches
        trial = study.ask()
        space.fn(trial)
        names |= set(trial.params)
    return sorted(names)


def check_inputs(s: Settings) -> tuple[Any, Any, Any]:
    """Everything that can be checked without Ray: returns (space, objective, TrialSpec)."""
    import optuna

    from lada_core.backbone import check_weights_available
    from lada_core.benchmarks import benchmark_names
    from lada_core.config import build_config
    from search_spaces import get_space
    from sweeps.objective import parse_metric
    from sweeps.trainable import TrialSpec

    space = get_space(s.space)
    objective = parse_metric(s.metric)
    base = base_config(s)
    cache_cfg = build_config(overrides=s.set, base=base)
    bench = cache_cfg.data.benchmark
    if bench not in benchmark_names() and not bench.endswith((".yaml", ".yml")):
        raise UsageError(f"unknown benchmark {bench!r} (valid: {', '.join(benchmark_names())}, or a benchmark .yaml file)")
    # The driver loads the image encoder (the cache key) and every trial its text tower: weights that
    # cannot be had are an error now, not after a cluster has started.
    check_weights_available(cache_cfg.backbone.model, cache_cfg.backbone.pretrained, cache_cfg.backbone.model_config_dir)
    spec = TrialSpec(base_config=base.to_dict(), overrides=tuple(s.set), cache_path=None, objective=objective)
    # Every point the sweep will certainly evaluate, and a few samples, must give valid configs that
    # keep the cache's data and backbone.
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=s.seed))
    finally:
        optuna.logging.set_verbosity(level)
    samples = [dict(p) for p in space.points_to_evaluate()]
    samples += parse_points(s.point, suggested_names(space, s.seed), spec)
    for _ in range(3):
        samples.append(space.sample(study.ask()))
    for sample in samples:
        cfg = spec.config(sample)
        if cfg.data != cache_cfg.data or cfg.backbone != cache_cfg.backbone:
            raise UsageError(f"space {space.name} changes data.* or backbone.* settings ({sample}): those define the shared feature cache")
    return space, objective, spec


def _auth_env_for_address() -> None:
    """Ray 2.59+ clusters started with ``ray start --head`` use token authentication when a token
    exists (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``), but a process
    that connects to one does not switch it on by itself: do it here, before ``import ray``."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def _connect_ray(args: argparse.Namespace, s: Settings) -> None:
    import ray

    if args.address:
        _address_reachable(args.address)
        try:
            ray.init(address=args.address, log_to_driver=args.verbose > 0)
        except Exception as exc:  # ConnectionError, ray.exceptions.AuthenticationError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = ""
            if "auth" in first.lower() or "token" in first.lower():
                hint = " (token authentication: give this process the cluster's token with RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN, and RAY_AUTH_MODE=token)"
            raise UsageError(f"--address {args.address}: could not connect to Ray: {first[:300]}{hint}") from None
    else:
        ray.init(num_cpus=args.local_cpus, num_gpus=args.local_gpus, include_dashboard=False, log_to_driver=args.verbose > 0)


def _encode_runner(kind: str) -> Any:
    """``--encode-on ray``: the feature extraction on Ray encoder actors (one per GPU) of the cluster
    this driver is connected to (:class:`sweeps.ray_cache.RayJobRunner`); the cache root must be
    storage every node shares."""
    if kind != "ray":
        return None
    from sweeps.ray_cache import RayJobRunner

    return RayJobRunner(progress=sys.stderr.isatty())


def build_cache(s: Settings, spec: Any, encode_on: str) -> tuple[Any, Any]:
    from lada_core.config import build_config, from_dict
    from lada_core.features import ensure_cache, load_bundle

    cache_cfg = build_config(overrides=list(spec.overrides), base=from_dict(dict(spec.base_config)))
    info = ensure_cache(cache_cfg, progress=sys.stderr.isatty(), run_jobs=_encode_runner(encode_on))
    bundle = load_bundle(info.path)
    return info, bundle


def mlflow_experiment(s: Settings) -> tuple[Any, str]:
    """A client and the sweep's experiment (created if needed: a new sqlite store creates its tables,
    seconds, which :func:`_run_sweep` overlaps with the start of a local Ray)."""
    from sweeps.tracking import get_or_create_experiment, open_client

    client = open_client(s.mlflow_uri)
    return client, get_or_create_experiment(client, s.experiment, s.mlflow_uri)


def open_parent_run(s: Settings, benchmark: str, info: Any, prepared: tuple[Any, str] | None = None) -> tuple[Any, str, str]:
    """The sweep's parent run (created once; reopened on --resume)."""
    from mlflow.entities import Param, RunTag

    from sweeps.tracking import SWEEP_TAG, git_commit

    client, exp_id = prepared or mlflow_experiment(s)
    if s.parent_run_id:
        try:
            run = client.get_run(s.parent_run_id)
            if run.info.status != "RUNNING":
                client.update_run(s.parent_run_id, status="RUNNING")
            return client, exp_id, s.parent_run_id
        except Exception:
            pass
    commit = git_commit()
    tags = {
        SWEEP_TAG: s.name, "lada.space": s.space, "lada.benchmark": benchmark, "lada.cache_key": info.key,
        "lada.role": "sweep",
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run = client.create_run(exp_id, run_name=s.name, tags=tags)
    params = {
        "space": s.space, "benchmark": benchmark, "metric": s.metric, "mode": s.mode, "num_samples": s.num_samples,
        "scheduler": s.scheduler, "seed": s.seed, "cpus_per_trial": s.cpus_per_trial, "gpus_per_trial": s.gpus_per_trial,
        "cache_key": info.key, "sets": " ".join(s.set) or "-", "num_tasks": s.num_tasks,
    }
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()], tags=[RunTag("lada.storage", s.folder)])
    return client, exp_id, run.info.run_id


def effective_concurrency(s: Settings, max_concurrent: int, cluster: dict[str, float], gpus: float) -> int:
    cap = int(cluster.get("CPU", 1) // max(s.cpus_per_trial, 1e-9))
    if gpus > 0:
        cap = min(cap, int(cluster.get("GPU", 0) // gpus))
    cap = max(1, cap)
    if max_concurrent > 0:
        cap = min(cap, max_concurrent)
    return max(1, min(cap, s.num_samples))


def run_sweep(args: argparse.Namespace) -> int:
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    auth_before = os.environ.get("RAY_AUTH_MODE")
    if args.address:
        _auth_env_for_address()
    try:
        return _run_sweep(args)
    finally:
        if auth_before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_before


def _run_sweep(args: argparse.Namespace) -> int:
    import ray
    from ray import tune

    from sweeps.resources import check_cluster, validate_request
    from sweeps.search import LadaOptunaSearch, make_sampler, open_storage, study_exists
    from sweeps.trainable import TASKS_DONE, lada_trainable

    t_start = getattr(args, "t0", None) or time.time()
    s = resolve_settings(args)
    space, objective, spec = check_inputs(s)
    validate_request(s.cpus_per_trial, s.gpus_per_trial or 0.0)
    folder = s.folder
    exists = load_settings(s.storage, s.name) is not None or (not is_uri(folder) and Path(folder).exists() and any(Path(folder).iterdir()))
    if exists and not args.resume:
        raise UsageError(f"sweep {s.name!r} already exists in {s.storage}: pass --resume to continue it, or choose another --name")
    if not args.resume and _study_file_exists(s.study_storage) and study_exists(open_storage(s.study_storage), s.name):
        raise UsageError(f"an Optuna study named {s.name!r} already exists in {s.study_storage}: pass --resume or choose another --name")
    if not is_uri(folder):
        from sweeps.storage import check_writable

        check_writable(folder)  # a read-only or impossible results folder: one line, before anything runs
    extra_points = parse_points(s.point, suggested_names(space, s.seed), spec)
    if s.mlflow_uri.startswith(("http://", "https://")):
        # MLflow's defaults retry an unreachable server for minutes per call; the tracker has its own
        # retry policy (and Ray's results to catch up from), so fail each call fast.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a line per closed run
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # its retry notes; ours say it once

    phases = {"inputs": time.time()}  # when each set-up step ended (for the summary's set-up breakdown)
    mlflow_ready = None
    if not args.address:  # a local Ray takes seconds to start: prepare the MLflow store meanwhile
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lada-mlflow-setup")
        mlflow_ready = pool.submit(mlflow_experiment, s)
        pool.shutdown(wait=False)
    _connect_ray(args, s)
    phases["ray_start"] = time.time()
    try:
        cluster = ray.cluster_resources()
        gpus = s.gpus_per_trial if s.gpus_per_trial is not None else (1.0 if cluster.get("GPU", 0) >= 1 else 0.0)
        if s.gpus_per_trial is None:
            s.gpus_per_trial = gpus
        check_cluster(s.cpus_per_trial, gpus)

        info, bundle = build_cache(s, spec, args.encode_on)
        phases["cache"] = time.time()
        s.cache_key, s.cache_path = info.key, str(info.path)
        s.num_tasks = len(bundle.tasks)
        s.dataset_names = list(bundle.task_names)
        from dataclasses import replace

        from sweeps.storage import DRIVER_SESSION

        spec = replace(spec, cache_path=str(info.path), results_dir=None if is_uri(folder) else folder, driver_session=DRIVER_SESSION)
        try:
            prepared = mlflow_ready.result() if mlflow_ready is not None else None
            client, exp_id, parent = open_parent_run(s, spec.config({}).data.benchmark, info, prepared)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"MLflow at {s.mlflow_uri}: could not open the sweep's parent run ({first}); start the tracking server or choose another --mlflow-uri") from None
        s.parent_run_id = parent
        save_settings(s)
        print(f"lada-sweep: {s.name}: space {s.space}, {s.num_samples} trials, objective {objective.name} ({s.mode}), "
              f"{s.num_tasks} tasks, scheduler {s.scheduler}; results {folder}; study {s.study_storage}; "
              f"MLflow {s.mlflow_uri} (parent run {parent})", file=sys.stderr, flush=True)

        from sweeps.objective import OBJECTIVE
        from sweeps.tracking import MlflowTracker

        phases["mlflow_parent"] = time.time()
        storage = open_storage(s.study_storage)
        searcher = LadaOptunaSearch(
            space.fn, metric=OBJECTIVE, mode=s.mode, points_to_evaluate=[*space.points_to_evaluate(), *extra_points],
            sampler=make_sampler(s.seed), study_name=s.name, storage=storage,
        )
        if s.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            if not 1 <= s.grace_period <= s.num_tasks:
                raise UsageError(f"--grace-period must be between 1 and the number of tasks ({s.num_tasks}), got {s.grace_period}")
            if s.reduction_factor <= 1:
                raise UsageError(f"--reduction-factor must be > 1, got {s.reduction_factor:g}")
            scheduler: Any = ASHAScheduler(
                time_attr=TASKS_DONE, max_t=s.num_tasks, grace_period=s.grace_period, reduction_factor=s.reduction_factor
            )
        else:
            from ray.tune.schedulers import FIFOScheduler

            scheduler = FIFOScheduler()
        from sweeps.storage import ResultLedger, StorageGuard

        tracker = MlflowTracker(s.mlflow_uri, exp_id, parent, sweep_name=s.name, spec=spec, extra_tags={"lada.space": s.space})
        guard = StorageGuard(folder)
        trainable = tune.with_resources(tune.with_parameters(lada_trainable, spec=spec), {"cpu": s.cpus_per_trial, "gpu": gpus})
        concurrency = effective_concurrency(s, args.max_concurrent, cluster, gpus)
        run_config = tune.RunConfig(
            name=s.name,
            storage_path=s.storage,
            callbacks=[tracker, guard, *([] if is_uri(folder) else [ResultLedger(folder)])],
            stop=guard,  # only used when Tune's interrupt handler is missing (see sweeps.storage)
            # Each task checkpoint holds the whole state: keep the last two (Tune forces an experiment
            # snapshot every num_to_keep trial checkpoints, so 1 would snapshot at every task).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            verbose=args.verbose,
        )
        tune_config = tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            metric=OBJECTIVE,
            mode=s.mode,
            num_samples=s.num_samples,
            max_concurrent_trials=args.max_concurrent or None,
            time_budget_s=args.time_budget_s,
            # A trial's process keeps torch/open_clip imported for the next trial (seconds per trial).
            reuse_actors=not getattr(args, "no_reuse_actors", False),
        )
        t_fit = time.time()
        tuner = None
        guard.install_filters()
        from sweeps import ray_compat

        ray_compat.ignore_stale_task_failures()  # a node lost: Tune must not end a trial it has requeued
        try:
            if args.resume and tune.Tuner.can_restore(folder):
                from sweeps.search import expect_tune_trials, saved_tune_trials

                expect_tune_trials(None if is_uri(folder) else saved_tune_trials(folder))
                tuner = tune.Tuner.restore(folder, trainable, resume_unfinished=True, resume_errored=True)
                _apply_runtime_overrides(tuner, args)
            else:
                if args.resume:  # stopped before Tune saved any state: start over, closing what it left
                    searcher.fail_orphans()
                tuner = tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)
            grid = tuner.fit()
        except Exception as exc:
            from sweeps.storage import describe

            found = describe(exc, folder)
            if found is None:
                raise
            guard.message = guard.message or found  # after fit: nothing left to interrupt
            grid = None
        finally:
            used_guard = (_callback_of(tuner, StorageGuard) if tuner is not None else None) or guard
            for g in {id(guard): guard, id(used_guard): used_guard}.values():
                g.remove_filters()
        t_end = time.time()
        used = (_tracker_of(tuner) if tuner is not None else None) or tracker
        if used_guard.tripped or guard.tripped:
            return storage_stop(s, grid, client, parent, used, used_guard.message or guard.message or "", t_start, t_fit, t_end,
                                study=searcher.study)
        summary = summarize(s, grid, objective, t_start, t_fit, t_end, concurrency)
        marks = [("start", t_start), *phases.items(), ("optuna_and_tune", t_fit)]
        summary["setup_phases_s"] = {name: round(t - marks[i - 1][1], 3) for i, (name, t) in enumerate(marks) if i > 0}
        summary["mlflow_callback_s"] = used.seconds
        summary["mlflow_calls"] = used.calls
        summary["mlflow_unsent"] = list(used.unsent())
        finish_parent(s, client, parent, summary, spec, storage)
        print_summary(summary)
        return 0 if summary["completed"] > 0 else 1
    finally:
        ray.shutdown()


def _tracker_of(tuner: Any) -> Any:
    """The MLflow callback Tune actually ran (a restored Tuner runs its own unpickled copy)."""
    from sweeps.tracking import MlflowTracker

    return _callback_of(tuner, MlflowTracker)


def _callback_of(tuner: Any, cls: type) -> Any:
    from sweeps import ray_compat

    for cb in ray_compat.tuner_callbacks(tuner):
        if isinstance(cb, cls):
            return cb
    return None


def storage_stop(s: Settings, grid: Any, client: Any, parent: str, tracker: Any, message: str,
                 t_start: float, t_fit: float, t_end: float, study: Any = None) -> int:
    """The sweep was stopped by a storage failure: one line naming the path, what is kept, how to
    continue; the parent run says why. Nothing more is written to the results folder."""
    from mlflow.entities import RunTag

    from sweeps.storage import EXIT_STORAGE

    rows = trial_rows(grid, s.num_tasks or 0, interrupted=True) if grid is not None else []
    done = sum(1 for r in rows if r["outcome"] in ("completed", "pruned"))
    if grid is None and study is not None:  # Tune itself stopped: the study (read, not written) counts them
        try:
            from optuna.trial import TrialState

            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        except Exception:
            pass
    try:
        client.log_batch(parent, tags=[RunTag("lada.error", message[:4000]), RunTag("lada.stopped", "storage")])
        client.set_terminated(parent, status="FAILED")
    except Exception:
        pass
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    if rows:
        print(f"sweep {s.name}: {len(rows)} trials ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}) "
              f"after {t_end - t_start:.1f}s", file=sys.stdout)
    storage_flag = f" --storage {s.storage}" if s.storage != str(Path(DEFAULT_STORAGE).resolve()) else ""
    print(f"lada-sweep: error: {message}: the sweep stopped; its {done} finished trial{'' if done == 1 else 's'} {'is' if done == 1 else 'are'} kept in {s.folder}; "
          f"free space (or make the folder writable) and continue with: lada-sweep --resume --name {s.name}{storage_flag}",
          file=sys.stderr, flush=True)
    return EXIT_STORAGE


def _study_file_exists(url: str) -> bool:
    """False for a sqlite/journal file that does not exist yet (checking must not create it)."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):]).exists()
    if "://" not in url:
        return Path(url).exists()
    return True


def _apply_runtime_overrides(tuner: Any, args: argparse.Namespace) -> None:
    """On --resume, settings that may change between drivers: concurrency and the time budget."""
    from sweeps import ray_compat

    ray_compat.apply_runtime_overrides(tuner, args.max_concurrent, args.time_budget_s, args.verbose, args.max_failures)


def trial_rows(grid: Any, num_tasks: int, interrupted: bool = False) -> list[dict[str, Any]]:
    """One row per trial of a ResultGrid: id, status, outcome, objective, params, times.
    ``interrupted``: the sweep was stopped (storage failure), so an unfinished trial is "stopped"."""
    from lada_core import metrics as M
    from sweeps.objective import OBJECTIVE
    from sweeps.storage import STORAGE_ERROR
    from sweeps.trainable import DIVERGED, NODE_ID, TASK_SECONDS, TASKS_DONE

    rows = []
    for r in grid:
        m = r.metrics or {}
        done = int(m.get(TASKS_DONE, 0) or 0)
        if m.get(STORAGE_ERROR) or (interrupted and done < num_tasks and not m.get(DIVERGED)):
            outcome = "stopped"
        elif r.error is not None:
            outcome = "failed"
        elif m.get(DIVERGED):
            outcome = "diverged"
        elif done < num_tasks:
            outcome = "pruned" if done > 0 else "not run"
        else:
            outcome = "completed"
        rows.append({
            "trial_id": m.get("trial_id") or (r.path.rsplit("/", 1)[-1] if r.path else "?"),
            "outcome": outcome,
            "objective": m.get(OBJECTIVE),
            **{k: m.get(k) for k in M.METRICS},
            "tasks_done": done,
            "time_total_s": float(m.get("time_total_s", 0.0) or 0.0),
            "task_seconds": float(m.get(TASK_SECONDS, 0.0) or 0.0),
            "node_id": m.get(NODE_ID),
            "config": dict(r.config or {}),
        })
    return rows


def summarize(s: Settings, grid: Any, objective: Any, t_start: float, t_fit: float, t_end: float, concurrency: int) -> dict[str, Any]:
    from sweeps import ray_compat

    rows = trial_rows(grid, s.num_tasks or 0)
    completed = [r for r in rows if r["outcome"] == "completed" and r["objective"] is not None and math.isfinite(r["objective"])]
    sign = 1 if s.mode == "max" else -1
    best = max(completed, key=lambda r: sign * r["objective"]) if completed else None
    trial_time = sum(r["time_total_s"] for r in rows)
    fit_wall = t_end - t_fit
    ideal = trial_time / max(1, concurrency)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    return {
        "name": s.name,
        "space": s.space,
        "objective": objective.name,
        "mode": s.mode,
        "trials": len(rows),
        "completed": len(completed),
        "outcomes": counts,
        "best": best,
        "rows": rows,
        "wall_s": t_end - t_start,
        "t_start": t_start,
        "t_fit": t_fit,
        "t_end": t_end,
        "fit_wall_s": fit_wall,
        "setup_s": t_fit - t_start,
        "trial_time_sum_s": trial_time,
        "concurrency": concurrency,
        "overhead_share": max(0.0, 1.0 - ideal / fit_wall) if fit_wall > 0 else 0.0,
        "overhead_share_total": max(0.0, 1.0 - ideal / (t_end - t_start)) if t_end > t_start else 0.0,
        "folder": s.folder,
        "study_storage": s.study_storage,
        "mlflow_uri": s.mlflow_uri,
        "parent_run_id": s.parent_run_id,
        "guarantees": ray_compat.guarantees(),
    }


def finish_parent(s: Settings, client: Any, parent: str, summary: dict[str, Any], spec: Any, storage: Any) -> None:
    """Best config YAML (next to the results and on the parent run), best value, importances."""
    from lada_core.config import config_to_yaml

    best = summary["best"]
    yaml_text = config_to_yaml(spec.config(best["config"])) if best is not None else None
    try:
        _write_text(join_path(s.folder, SUMMARY_FILE), json.dumps({k: v for k, v in summary.items()}, indent=2, default=str))
        if yaml_text is not None:
            _write_text(join_path(s.folder, BEST_CONFIG), yaml_text)
    except OSError as exc:
        from sweeps.storage import describe

        print(f"lada-sweep: warning: summary not written ({describe(exc, s.folder) or exc})", file=sys.stderr)
    fig = None
    try:
        from sweeps.report import importance_figure, load_study_for

        fig = importance_figure(load_study_for(s.study_storage, s.name))
    except Exception as exc:  # too few finished trials, constant parameters
        logging.getLogger(__name__).info("no importances: %s", exc)
    try:
        write_parent_end(client, parent, summary, yaml_text, fig)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        print(f"lada-sweep: warning: MLflow parent run not updated ({first}); once MLflow is reachable: "
              f"python -m sweeps.report --name {s.name} --storage {s.storage} --sync-mlflow", file=sys.stderr)


def write_parent_end(client: Any, parent: str, summary: dict[str, Any], yaml_text: str | None, importance_fig: Any = None) -> None:
    """Close the sweep's parent run: counts, wall time, overhead, best value and config, importances."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    best = summary.get("best")
    metrics = [
        Metric("trials_completed", float(summary["completed"]), now, 0),
        Metric("sweep_wall_s", float(summary["wall_s"]), now, 0),
        Metric("overhead_share", float(summary["overhead_share"]), now, 0),
    ]
    tags = [RunTag("lada.outcomes", json.dumps(summary["outcomes"]))]
    if best is not None:
        name = summary["objective"] if "," not in summary["objective"] else "objective"
        metrics.append(Metric(f"best_{name}", float(best["objective"]), now, 0))
        tags.append(RunTag("lada.best_trial_id", str(best["trial_id"])))
        if yaml_text is not None:
            client.log_text(parent, yaml_text, BEST_CONFIG)
    client.log_batch(parent, metrics=metrics, tags=tags)
    client.log_dict(parent, {k: v for k, v in summary.items() if k != "rows"}, SUMMARY_FILE)
    if importance_fig is not None:
        client.log_figure(parent, importance_fig, "param_importances.png")
    client.set_terminated(parent, status="FINISHED")


def print_summary(summary: dict[str, Any]) -> None:
    best = summary["best"]
    out = sys.stdout
    print(f"sweep {summary['name']}: {summary['trials']} trials ({', '.join(f'{v} {k}' for k, v in sorted(summary['outcomes'].items()))})", file=out)
    if best is not None:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(best["config"].items()))
        print(f"best {summary['objective']} = {best['objective']:.3f} (trial {best['trial_id']}: {params or 'paper defaults'})", file=out)
        print(f"best config: {join_path(summary['folder'], BEST_CONFIG)}  (lada-train --config {join_path(summary['folder'], BEST_CONFIG)})", file=out)
    print(
        f"wall time {summary['wall_s']:.1f}s (setup {summary['setup_s']:.1f}s + trials {summary['fit_wall_s']:.1f}s); "
        f"sum of trial times {summary['trial_time_sum_s']:.1f}s over concurrency {summary['concurrency']}: "
        f"Ray+MLflow overhead {100 * summary['overhead_share']:.1f}% of the trial phase, "
        f"{100 * summary['overhead_share_total']:.1f}% of the whole command",
        file=out,
    )
    if "mlflow_callback_s" in summary:
        print(
            f"of the trial phase, the MLflow callback took {summary['mlflow_callback_s']:.1f}s in the driver "
            f"({summary['mlflow_calls']} MLflow calls, batched); the rest of the overhead is Ray "
            f"(actor start, scheduling, checkpoint persistence, experiment snapshots)",
            file=out,
        )
    inactive = {k: v for k, v in (summary.get("guarantees") or {}).items() if v != "active"}
    for name, why in sorted(inactive.items()):
        print(f"guarantee {name} was {why} (see sweeps/ray_compat.py)", file=out)
    print(f"MLflow: mlflow ui --backend-store-uri {summary['mlflow_uri']}  (parent run {summary['parent_run_id']})", file=out)
    pending, deferred = summary.get("mlflow_unsent") or (0, 0)
    if pending or deferred:
        print(f"MLflow was unreachable: {pending} metric points and {deferred} trial ends are not in it yet (Ray's results hold them); "
              f"once it is back: python -m sweeps.report --name {summary['name']} --storage {Path(summary['folder']).parent} --sync-mlflow", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lada-sweep``; returns the exit code (2: bad input, 1: no trial completed,
    3: the results folder could not be written - disk full, read-only - and the sweep stopped)."""
    t0 = time.time()  # the sweep's wall time counts from here (the heavy imports are lazy)
    from lada_core.backbone import BackboneError
    from lada_core.benchmarks import DataError
    from lada_core.config import ConfigError
    from search_spaces import UnknownSpaceError
    from sweeps.objective import MetricError
    from sweeps.resources import ResourceError
    from sweeps.storage import EXIT_STORAGE, StorageError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.t0 = t0
    try:
        return run_sweep(args)
    except (UsageError, UnknownSpaceError, MetricError, ConfigError, ResourceError, DataError, BackboneError) as exc:
        print(f"lada-sweep: error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"lada-sweep: error: {exc}", file=sys.stderr)
        return EXIT_STORAGE
    except KeyboardInterrupt:
        print("lada-sweep: interrupted; continue with --resume --name <name>", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

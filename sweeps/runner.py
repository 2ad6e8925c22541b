"""Run a checked :class:`~sweeps.plan.SweepPlan`: connect Ray, build the feature cache once, open the
MLflow parent run and the Optuna study, build the Tuner (or restore it on ``--resume``), fit, summarize.

Order of work: a local Ray takes seconds to start, so the MLflow store is prepared meanwhile; the
sweep's settings are saved (``sweep.json``) once the cache and the parent run are known, before any
trial runs; the summary is written last.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

from sweeps.plan import SweepPlan
from sweeps.settings import RunOptions, Settings, UsageError, is_uri, save_settings


def run(plan: SweepPlan) -> int:
    """Run the sweep of ``plan``; returns ``lada-sweep``'s exit code."""
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    auth_before = os.environ.get("RAY_AUTH_MODE")
    if plan.options.address:
        _auth_env_for_address()
    try:
        return _run(plan)
    finally:
        if auth_before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_before


@dataclass
class _Started:
    """What the driver set up before the trials: settings completed, Ray's resources, MLflow."""

    settings: Settings
    spec: Any
    cluster: dict[str, float]
    gpus: float
    client: Any
    parent: str
    exp_id: str
    phases: dict[str, float]


@dataclass
class _Parts:
    """The pieces of the Tuner (the callbacks are the driver's copies; a restored Tuner has its own)."""

    searcher: Any
    tracker: Any
    guard: Any
    trainable: Any
    run_config: Any
    tune_config: Any
    concurrency: int


def _run(plan: SweepPlan) -> int:
    import ray

    t_start = plan.options.t0 or time.time()
    _mlflow_http_env(plan.settings.mlflow_uri)
    phases = {"inputs": time.time()}  # when each set-up step ended (for the summary's set-up breakdown)
    from sweeps.console import QuietLogs, log_path

    # Ray's, Tune's, Optuna's and MLflow's logging -> the sweep's log file (--verbose 1/2: also the console)
    quiet = QuietLogs(log_path(plan.settings.folder, plan.settings.name), plan.options.verbose, local_ray=not plan.options.address)
    quiet.__enter__()
    mlflow_ready = None
    if not plan.options.address:  # a local Ray takes seconds to start: prepare the MLflow store meanwhile
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lada-mlflow-setup")
        mlflow_ready = pool.submit(mlflow_experiment, plan.settings)
        pool.shutdown(wait=False)
    try:
        session_dir = connect_ray(plan.options)
        phases["ray_start"] = time.time()
        started = _start(plan, mlflow_ready, phases, (quiet.path, session_dir))
        parts = _assemble(plan, started)
        t_fit = time.time()
        tuner, grid, guard = _fit(plan, started, parts)
        t_end = time.time()
        return _finish(plan, started, parts, tuner, grid, guard, (t_start, t_fit, t_end))
    finally:
        ray.shutdown()
        quiet.__exit__(None, None, None)


def _mlflow_http_env(uri: str) -> None:
    """MLflow's defaults retry an unreachable server for minutes per call; the tracker has its own
    retry policy (and Ray's results to catch up from), so fail each call fast."""
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a line per closed run
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # its retry notes; ours say it once


def _start(plan: SweepPlan, mlflow_ready: Any, phases: dict[str, float], logs: tuple[Any, str | None]) -> _Started:
    """Resources, the feature cache, the parent run; the settings completed and saved; the header
    (``logs``: the sweep's log file and Ray's session folder)."""
    import ray

    from sweeps.console import header_lines, mlflow_run_url
    from sweeps.resources import check_cluster

    s = plan.settings
    cluster = ray.cluster_resources()
    gpus = s.gpus_per_trial if s.gpus_per_trial is not None else (1.0 if cluster.get("GPU", 0) >= 1 else 0.0)
    check_cluster(s.cpus_per_trial, gpus)
    info, bundle = build_cache(plan.cache_config, plan.options.encode_on)
    phases["cache"] = time.time()
    s = replace(s, gpus_per_trial=gpus, cache_key=info.key, cache_path=str(info.path), num_tasks=len(bundle.tasks),
                dataset_names=tuple(bundle.task_names))
    spec = replace(plan.spec, cache_path=str(info.path), results_dir=None if is_uri(s.folder) else s.folder)
    try:
        prepared = mlflow_ready.result() if mlflow_ready is not None else None
        client, exp_id, parent = open_parent_run(s, plan.benchmark, info, prepared)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"MLflow at {s.mlflow_uri}: could not open the sweep's parent run ({first}); start the tracking server or choose another --mlflow-uri") from None
    s = replace(s, parent_run_id=parent)
    save_settings(s)
    worker_logs = f"{logs[1]}/logs" if logs[1] and plan.options.verbose == 0 else None
    header = header_lines(s, plan.objective.name, logs[0], mlflow_run_url(s.mlflow_uri, exp_id, parent), worker_logs)
    print("\n".join(header), file=sys.stderr, flush=True)
    phases["mlflow_parent"] = time.time()
    return _Started(s, spec, dict(cluster), gpus, client, parent, exp_id, phases)


def _scheduler(s: Settings) -> Any:
    from sweeps.trainable import TASKS_DONE

    num_tasks = s.num_tasks or 1
    if s.scheduler != "asha":
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()
    from ray.tune.schedulers import ASHAScheduler

    if not 1 <= s.grace_period <= num_tasks:
        raise UsageError(f"--grace-period must be between 1 and the number of tasks ({num_tasks}), got {s.grace_period}")
    if s.reduction_factor <= 1:
        raise UsageError(f"--reduction-factor must be > 1, got {s.reduction_factor:g}")
    return ASHAScheduler(time_attr=TASKS_DONE, max_t=num_tasks, grace_period=s.grace_period, reduction_factor=s.reduction_factor)


def _assemble(plan: SweepPlan, started: _Started) -> _Parts:
    """The searcher, the callbacks, the trainable and Tune's configs."""
    from ray import tune

    from sweeps.objective import OBJECTIVE
    from sweeps.optuna_storage import make_sampler
    from sweeps.progress import SweepProgress
    from sweeps.search import LadaSearcher
    from sweeps.storage import StorageGuard
    from sweeps.tracking import MlflowTracker
    from sweeps.trainable import lada_trainable

    s, opts = started.settings, plan.options
    searcher = LadaSearcher(plan.space.fn, metric=OBJECTIVE, mode=s.mode, points_to_evaluate=list(plan.points),
                            sampler=make_sampler(s.seed), study_name=s.name, storage=s.study_storage,
                            num_samples=s.num_samples)
    scheduler = _scheduler(s)
    tracker = MlflowTracker(s.mlflow_uri, started.exp_id, started.parent, sweep_name=s.name, spec=started.spec,
                            extra_tags={"lada.space": s.space})
    guard = StorageGuard(s.folder)
    trainable = tune.with_resources(tune.with_parameters(lada_trainable, spec=started.spec), {"cpu": s.cpus_per_trial, "gpu": started.gpus})
    run_config = tune.RunConfig(
        name=s.name,
        storage_path=s.storage,
        callbacks=[tracker, guard,
                   SweepProgress(s.num_samples, s.num_tasks or 1, plan.objective.name, s.mode, in_place=None if opts.verbose == 0 else False)],
        stop=guard,  # only used when Tune's interrupt handler is missing (see sweeps.storage)
        # Each task checkpoint holds the whole state: keep the last two (Tune forces an experiment
        # snapshot every num_to_keep trial checkpoints, so 1 would snapshot at every task).
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        verbose=opts.verbose,
    )
    tune_config = tune.TuneConfig(
        search_alg=searcher, scheduler=scheduler, metric=OBJECTIVE, mode=s.mode, num_samples=s.num_samples,
        max_concurrent_trials=opts.max_concurrent or None, time_budget_s=opts.time_budget_s,
        # A trial's process keeps torch/open_clip imported for the next trial (seconds per trial).
        reuse_actors=opts.reuse_actors,
    )
    concurrency = effective_concurrency(s, opts.max_concurrent, started.cluster, started.gpus)
    return _Parts(searcher, tracker, guard, trainable, run_config, tune_config, concurrency)


def _fit(plan: SweepPlan, started: _Started, parts: _Parts) -> tuple[Any, Any, Any]:
    """Fit a new Tuner, or restore and continue one on ``--resume``. Returns (tuner, result grid or
    None when a storage failure ended the fit, the storage guard Tune ran)."""
    from ray import tune

    from sweeps import ray_compat
    from sweeps.storage import StorageGuard, describe

    folder, opts, guard = started.settings.folder, plan.options, parts.guard
    tuner = None
    grid = None
    guard.install_filters()
    ray_compat.ignore_stale_task_failures()  # a node lost: Tune must not end a trial it has requeued
    try:
        if opts.resume and tune.Tuner.can_restore(folder):
            from sweeps.recovery import expect_tune_trials, saved_tune_trials

            expect_tune_trials(None if is_uri(folder) else saved_tune_trials(folder))
            tuner = tune.Tuner.restore(folder, parts.trainable, resume_unfinished=True, resume_errored=True)
            ray_compat.apply_runtime_overrides(tuner, opts.max_concurrent, opts.time_budget_s, opts.verbose, opts.max_failures)
        else:
            if opts.resume:  # stopped before Tune saved any state: start over, closing what it left
                parts.searcher.fail_orphans()
            tuner = tune.Tuner(parts.trainable, tune_config=parts.tune_config, run_config=parts.run_config)
        grid = tuner.fit()
    except Exception as exc:
        found = describe(exc, folder)
        if found is None:
            raise
        guard.message = guard.message or found  # after fit: nothing left to interrupt
    finally:
        used_guard = callback_of(tuner, StorageGuard) or guard
        for g in {id(guard): guard, id(used_guard): used_guard}.values():
            g.remove_filters()
    if guard.tripped and not used_guard.tripped:
        used_guard.message = guard.message
    return tuner, grid, used_guard


def _finish(plan: SweepPlan, started: _Started, parts: _Parts, tuner: Any, grid: Any, guard: Any,
            times: tuple[float, float, float]) -> int:
    from sweeps import summary as S
    from sweeps.tracking import MlflowTracker

    s = started.settings
    t_start, t_fit, t_end = times
    used = callback_of(tuner, MlflowTracker) or parts.tracker
    if guard.tripped:
        return S.storage_stop(s, grid, started.client, started.parent, used, guard.message or "", t_start, t_fit, t_end,
                              study=parts.searcher.study)
    summary = S.summarize(s, grid, plan.objective, t_start, t_fit, t_end, parts.concurrency)
    marks = [("start", t_start), *started.phases.items(), ("optuna_and_tune", t_fit)]
    summary["setup_phases_s"] = {name: round(t - marks[i - 1][1], 3) for i, (name, t) in enumerate(marks) if i > 0}
    summary["mlflow_callback_s"] = used.seconds
    summary["mlflow_calls"] = used.calls
    summary["mlflow_unsent"] = list(used.unsent())
    from sweeps.console import mlflow_run_url

    summary["mlflow_run_url"] = mlflow_run_url(s.mlflow_uri, started.exp_id, started.parent)
    summary["experiment_id"] = started.exp_id
    S.finish_parent(s, started.client, started.parent, summary, started.spec)
    S.print_summary(summary)
    return 0 if summary["completed"] > 0 else 1


def callback_of(tuner: Any, cls: type) -> Any:
    """The callback of type ``cls`` Tune actually ran (a restored Tuner runs its own unpickled copy)."""
    from sweeps import ray_compat

    for cb in ray_compat.tuner_callbacks(tuner):
        if isinstance(cb, cls):
            return cb
    return None


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


def _auth_env_for_address() -> None:
    """Ray 2.59+ clusters started with ``ray start --head`` use token authentication when a token
    exists (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``), but a process
    that connects to one does not switch it on by itself: do it here, before ``import ray``."""
    from pathlib import Path

    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def connect_ray(opts: RunOptions) -> str | None:
    """Start a local Ray or connect to ``--address``; returns Ray's session folder (its ``logs/``
    hold the trials' output when ``--verbose 0`` keeps it off the console)."""
    import ray

    if opts.address:
        _address_reachable(opts.address)
        try:
            ctx = ray.init(address=opts.address, log_to_driver=opts.verbose > 0)
        except Exception as exc:  # ConnectionError, ray.exceptions.AuthenticationError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = ""
            if "auth" in first.lower() or "token" in first.lower():
                hint = " (token authentication: give this process the cluster's token with RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN, and RAY_AUTH_MODE=token)"
            raise UsageError(f"--address {opts.address}: could not connect to Ray: {first[:300]}{hint}") from None
    else:
        ctx = ray.init(num_cpus=opts.local_cpus, num_gpus=opts.local_gpus, include_dashboard=False, log_to_driver=opts.verbose > 0)
    return (getattr(ctx, "address_info", None) or {}).get("session_dir")


def build_cache(cache_cfg: Any, encode_on: str) -> tuple[Any, Any]:
    """The feature cache of the sweep (built once, or found), and its bundle. ``--encode-on ray``: the
    extraction on Ray encoder actors of the connected cluster (the cache root must be shared)."""
    from lada_core.features import ensure_cache, load_bundle

    runner = None
    if encode_on == "ray":
        from sweeps.ray_cache import RayJobRunner

        runner = RayJobRunner(progress=sys.stderr.isatty())
    info = ensure_cache(cache_cfg, progress=sys.stderr.isatty(), run_jobs=runner)
    return info, load_bundle(info.path)


def mlflow_experiment(s: Settings) -> tuple[Any, str]:
    """A client and the sweep's experiment (created if needed: a new sqlite store creates its tables,
    seconds, which :func:`_run` overlaps with the start of a local Ray)."""
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

"""One trial = one :func:`lada_core.trainer.run_continual` over the task sequence.

The trainer calls ``on_task_end`` after every task; the trial turns it into ``ray.tune.report`` with
that step's metrics (``task_index``, ``tasks_done``, Transfer / Average / Last of the matrix so far,
``acc/<dataset>``, all on the validation split and named ``val/...``; the objective computed from them;
with ``--peek-test`` also ``test/...``) and the task's checkpoint. ASHA reads the objective between tasks;
a retried or resumed trial restores its last checkpoint and continues at the next task.

The feature cache is opened memory-mapped in every trial (cheap; the pages are shared by all the
processes of a node, so a node holds one copy whatever the number of trials).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lada_core import metrics as M
from sweeps import faults
from sweeps.objective import OBJECTIVE, PEEK_SPLIT, TUNE_SPLIT, Objective, metric_key
from sweeps.results import (  # noqa: F401 - the result schema, also read from here
    DIVERGED,
    ERROR,
    NODE_ID,
    NUM_TASKS,
    REPLAYED,
    STORAGE_ERROR,
    TASK_SECONDS,
    TASKS_DONE,
    WORLD_SIZE,
)

STORAGE_WAIT_S = 120.0
"""How long a trial that could not write to storage waits for the driver to stop the sweep."""
TIMINGS_ENV = "LADA_TRIAL_TIMINGS"
"""A folder: when set, every trial appends where its time went to ``<folder>/<pid>.jsonl``
(``bench/sweep_overhead.py``); unset, nothing is measured or written."""


class _Timings:
    """Where a trial's time goes (process start, imports, cache and backbone load, compute, reports)."""

    def __init__(self, folder: str | None) -> None:
        self.folder = folder
        self.t: dict[str, Any] = {"enter": time.time(), "pid": os.getpid()}
        self.report_s = 0.0
        self.stage_s = 0.0
        if folder:
            try:
                import psutil

                self.t["process_start"] = psutil.Process().create_time()
            except Exception:
                pass

    def span(self, key: str, t0: float) -> float:
        now = time.time()
        self.t[key] = self.t.get(key, 0.0) + (now - t0)
        return now

    def write(self, **extra: Any) -> None:
        if not self.folder:
            return
        self.t.update(extra, exit=time.time(), report_s=self.report_s, stage_s=self.stage_s)
        try:
            Path(self.folder).mkdir(parents=True, exist_ok=True)
            with open(Path(self.folder) / f"{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps(self.t) + "\n")
        except OSError:
            pass


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial needs besides its sampled parameters (small and picklable)."""

    base_config: Mapping[str, Any]  # nested dict: defaults < --config < space BASE < CLI flags
    overrides: tuple[str, ...] = ()  # --set strings, applied last
    cache_path: str | None = None  # the finished feature cache (None = exact mode)
    objective: Objective = field(default_factory=lambda: Objective({M.AVERAGE: 1.0}))
    work_root: str | None = None  # node-local folder for the trainer's output (default: the temp dir)
    results_dir: str | None = None  # the sweep's folder when it is a local or shared path (not a URI)
    metric_split: str = TUNE_SPLIT  # the split the trainer scores (eval.split): "val" in a sweep, "test" in the final evaluation

    def config(self, sample: Mapping[str, Any]) -> Any:
        """The trial's Config: base < sample < --set."""
        from lada_core.config import build_config, from_dict

        return build_config(sample=dict(sample), overrides=list(self.overrides), base=from_dict(dict(self.base_config)))


def step_result(metrics: Mapping[str, float], task_index: int, num_tasks: int, seconds: float, objective: Objective,
                peek: Mapping[str, float] | None = None, split: str = TUNE_SPLIT) -> dict[str, Any]:
    """The result dict of one task step (what Tune, ASHA, Optuna and MLflow see). ``metrics`` are the
    trainer's on the validation split: each is reported as ``val/<name>`` and the objective is computed
    from them. ``peek`` (``--peek-test``): the trainer's ``test/<name>`` metrics, passed through."""
    out: dict[str, Any] = {metric_key(k, split): float(v) for k, v in metrics.items() if k != M.TASK_INDEX}
    for k, v in (peek or {}).items():
        if not k.startswith(metric_key("", PEEK_SPLIT)):
            raise ValueError(f"peek metric {k!r} is not a test/ metric")
        out[k] = float(v)
    out[M.TASK_INDEX] = int(task_index)
    out[TASKS_DONE] = int(task_index) + 1
    out[NUM_TASKS] = int(num_tasks)
    out[TASK_SECONDS] = float(seconds)
    value = objective.value(metrics)
    out[OBJECTIVE] = float(value)
    return out


def _world_size() -> int:
    """Data-parallel ranks of this trial: one per GPU Ray assigned (at least 1)."""
    try:
        import ray

        ids = ray.get_gpu_ids()
    except Exception:
        return 1
    return max(1, len(ids))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


_KEPT: dict[str, tuple[Any, Any]] = {}  # "bundle" / "backbone" -> (key, object), one of each per process


def _kept(kind: str, key: Any, make: Any) -> Any:
    """The object this worker process built for the previous trial, if it has the same key (Tune
    reuses a worker for the node's next trial): the memory-mapped cache and the frozen backbone are
    opened once per process, not once per trial. One of each is kept."""
    held = _KEPT.get(kind)
    if held is not None and held[0] == key:
        return held[1]
    _KEPT.pop(kind, None)  # drop the old one before building the new one
    obj = make()
    _KEPT[kind] = (key, obj)
    return obj


def _bundle_for(spec: TrialSpec) -> Any:
    if not spec.cache_path:
        return None
    from lada_core.features import load_bundle

    return _kept("bundle", spec.cache_path, lambda: load_bundle(spec.cache_path))


def _backbone_for(cfg: Any) -> Any:
    """The frozen backbone (random init is seeded, a checkpoint is fixed: rebuilding gives the same
    weights; training never changes them). Shared by the trials of a process, one at a time."""
    from lada_core.backbone import load_backbone

    b = cfg.backbone
    key = (b.model, b.pretrained, b.model_config_dir)
    return _kept("backbone", key, lambda: load_backbone(b.model, b.pretrained, device="cpu", model_config_dir=b.model_config_dir))


def _limit_threads() -> Any:
    """Hold the trial to the CPUs Ray gave it (``OMP_NUM_THREADS``, which Ray sets to the trial's CPU
    count). A worker process that imported torch before Ray set that variable (a preloaded worker,
    or one that ran something else first) has thread pools sized for the whole machine: two trials
    would then each run as many threads as there are cores, several times slower (measured: 5x on
    2 cores). Returns what to undo (None if nothing was set)."""
    n = os.environ.get("OMP_NUM_THREADS", "")
    if not n.isdigit() or int(n) < 1:
        return None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(int(n))  # BLAS and OpenMP pools (numpy, scikit-learn's k-means)
    except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
        limiter = None
    return before, limiter


def _restore_threads(held: Any) -> None:
    if held is None:
        return
    import torch

    before, limiter = held
    torch.set_num_threads(before)
    if limiter is not None:
        limiter.restore_original_limits()


def _workdir(spec: TrialSpec, trial_id: str) -> tuple[Path, Path, int]:
    """The trial's scratch folder and its ``run/`` folder holding the checkpoint to resume from (Tune's,
    or a newer stored one: :func:`sweeps.recovery.resume_point`); and the last step already held."""
    from ray import tune

    from sweeps.recovery import resume_point

    root = Path(spec.work_root or tempfile.gettempdir()) / "lada-trials" / trial_id
    shutil.rmtree(root, ignore_errors=True)
    workdir = root / "run"
    workdir.mkdir(parents=True)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        checkpoint.to_directory(str(workdir))  # task-NNN/ of the last finished task
    return root, workdir, resume_point(workdir, spec.results_dir, trial_id)


class _Reporter:
    """Turns the trainer's task ends into ``tune.report`` calls, each with its task checkpoint."""

    def __init__(self, spec: TrialSpec, root: Path, timings: _Timings, recorded: int, extra: dict[str, Any]) -> None:
        self.spec, self.root, self.timings, self.recorded, self.extra = spec, root, timings, recorded, extra
        self.last: dict[str, Any] = {}

    def report(self, result: dict[str, Any], checkpoint_dir: Path | None) -> None:
        from ray import tune

        t_rep = time.time()
        if checkpoint_dir is None:
            tune.report(result)
        else:
            stage = self.root / "report" / f"step-{result[M.TASK_INDEX]:03d}"
            shutil.copytree(checkpoint_dir, stage / Path(checkpoint_dir).name, copy_function=_link_or_copy)
            self.timings.stage_s += time.time() - t_rep
            try:
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(stage)))
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        self.timings.report_s += time.time() - t_rep
        self.last["result"] = result

    def on_task_end(self, te: Any) -> None:
        result = step_result(te.metrics, te.task_index, te.num_tasks, te.seconds, self.spec.objective, getattr(te, "peek", None),
                             self.spec.metric_split)
        result.update(self.extra)
        if getattr(te, "resumed", False):
            self.last["result"] = result
            if te.task_index > self.recorded:
                # Done after Tune's checkpoint (a driver restart after it, or a worker lost before Tune
                # fetched its checkpoint): report it again (no training), marked, with the checkpoint
                # on the last such step. The driver may hold it already: readers keep a step's first
                # report (sweeps.recovery).
                ckpt = Path(te.checkpoint_dir)
                result[REPLAYED] = 1
                self.report(result, ckpt if (ckpt / "state.pt").is_file() else None)
            return
        self.report(result, Path(te.checkpoint_dir))
        faults.at("trial.after_task", task=te.task_index)


def _report_end(last: dict[str, Any], fields: dict[str, Any]) -> None:
    """Report a trial's end that is not a task's: its last task's result, no value, ``fields``."""
    from ray import tune

    result = dict(last.get("result", {}))
    result.update({OBJECTIVE: math.nan, **fields})
    result.setdefault(TASKS_DONE, 0)
    tune.report(result)


def lada_trainable(config: dict[str, Any], spec: TrialSpec) -> None:
    """The Ray Tune function trainable (wrapped with ``tune.with_parameters(lada_trainable, spec=...)``)."""
    timings = _Timings(os.environ.get(TIMINGS_ENV))
    t_imp = time.time()
    import ray
    from ray import tune

    from lada_core.trainer import DivergenceError
    from sweeps.distributed import run_continual_parallel

    if timings.folder:
        import open_clip  # noqa: F401  (imported by the trainer anyway: counted here as an import)
    timings.span("imports_s", t_imp)

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id() or "local"
    cfg = spec.config(config)
    node_id = ray.get_runtime_context().get_node_id()
    root, workdir, recorded = _workdir(spec, trial_id)
    t0 = time.time()
    world = _world_size()
    reporter = _Reporter(spec, root, timings, recorded, {NODE_ID: node_id, WORLD_SIZE: world})
    last = reporter.last
    on_task_end = reporter.on_task_end
    threads = _limit_threads()
    timings.t.update(trial_id=trial_id, setup_s=t0 - timings.t["enter"] - timings.t.get("imports_s", 0.0))
    try:
        t_load = time.time()
        bundle = _bundle_for(spec)
        t_bb = timings.span("bundle_s", t_load)
        backbone = _backbone_for(cfg)
        timings.span("backbone_s", t_bb)
        run_continual_parallel(cfg, spec.cache_path, workdir, world, on_task_end=on_task_end, timings=timings.t if timings.folder else None,
                               bundle=bundle, backbone=backbone)
        timings.write(run_s=time.time() - t0)
    except DivergenceError as exc:
        # Retrying cannot help (same seed, same data): end the trial with the reason, as a failed value.
        _report_end(last, {DIVERGED: 1, ERROR: str(exc), NODE_ID: node_id})
        return
    except Exception as exc:
        from sweeps.storage import StorageError, describe

        found = describe(exc, spec.results_dir or ctx.get_trial_dir())
        if found is None:
            raise
        # A full or read-only disk: every retry and every other trial would fail the same way. Tell
        # the driver (its StorageGuard stops the sweep as Ctrl+C would, keeping this trial
        # resumable from its last stored checkpoint) and wait to be stopped.
        _report_end(last, {STORAGE_ERROR: found, ERROR: found, NODE_ID: node_id})
        deadline = time.monotonic() + STORAGE_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(0.5)
        raise StorageError(found) from None
    finally:
        _restore_threads(threads)
        shutil.rmtree(root, ignore_errors=True)
    # Every task already done and recorded by Tune (a trial restored from its last task's checkpoint:
    # its node was lost, or a driver restart, just after that report): nothing is reported again.
    # The function returns and Tune ends the trial with the result it holds (its "__duplicate__"
    # path: the searcher and callbacks see the end, nothing is logged twice).

"""One trial = one :func:`lada_core.trainer.run_continual` over the task sequence.

The trainer calls ``on_task_end`` after every task; the trial turns it into ``ray.tune.report`` with
that step's metrics (``task_index``, ``tasks_done``, Transfer / Average / Last of the matrix so far,
``acc/<dataset>``, the objective) and the task's checkpoint. ASHA reads the objective between tasks;
a retried or resumed trial restores its last checkpoint and continues at the next task.

The feature cache is opened memory-mapped in every trial (cheap; the pages are shared by all the
processes of a node, so a node holds one copy whatever the number of trials).
"""

from __future__ import annotations

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
from sweeps.objective import OBJECTIVE, Objective

TASKS_DONE = "tasks_done"
NUM_TASKS = "num_tasks"
TASK_SECONDS = "task_seconds"
DIVERGED = "diverged"
NODE_ID = "node_id"
WORLD_SIZE = "world_size"
ERROR = "error_message"


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial needs besides its sampled parameters (small and picklable)."""

    base_config: Mapping[str, Any]  # nested dict: defaults < --config < space BASE < CLI flags
    overrides: tuple[str, ...] = ()  # --set strings, applied last
    cache_path: str | None = None  # the finished feature cache (None = exact mode)
    objective: Objective = field(default_factory=lambda: Objective({M.AVERAGE: 1.0}))
    work_root: str | None = None  # node-local folder for the trainer's output (default: the temp dir)
    results_dir: str | None = None  # the sweep's folder when it is a local or shared path (not a URI)

    def config(self, sample: Mapping[str, Any]) -> Any:
        """The trial's Config: base < sample < --set."""
        from lada_core.config import build_config, from_dict

        return build_config(sample=dict(sample), overrides=list(self.overrides), base=from_dict(dict(self.base_config)))


def step_result(metrics: Mapping[str, float], task_index: int, num_tasks: int, seconds: float, objective: Objective) -> dict[str, Any]:
    """The result dict of one task step (what Tune, ASHA, Optuna and MLflow see)."""
    out: dict[str, Any] = {k: float(v) for k, v in metrics.items()}
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


def _task_index(folder: Path) -> int:
    """Index of the newest ``task-NNN`` checkpoint folder under ``folder`` (-1 if none)."""
    best = -1
    for p in folder.glob("task-*/state.pt"):
        try:
            best = max(best, int(p.parent.name.split("-")[1]))
        except (IndexError, ValueError):
            continue
    return best


def newest_stored_checkpoint(results_dir: str | None, trial_id: str) -> Path | None:
    """The newest ``task-NNN`` folder this trial persisted under the sweep's folder (local or shared
    storage). A driver killed between two experiment snapshots restores a trial from an older
    checkpoint than the trial had written; the newer one on disk saves redoing tasks."""
    if not results_dir:
        return None
    best: tuple[int, Path] | None = None
    for trial_dir in Path(results_dir).glob(f"*_{trial_id}_*"):
        for p in trial_dir.glob("checkpoint_*/task-*/state.pt"):
            try:
                k = int(p.parent.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if best is None or k > best[0]:
                best = (k, p.parent)
    return best[1] if best else None


def lada_trainable(config: dict[str, Any], spec: TrialSpec) -> None:
    """The Ray Tune function trainable (wrapped with ``tune.with_parameters(lada_trainable, spec=...)``)."""
    import ray
    from ray import tune

    from lada_core.trainer import DivergenceError
    from sweeps.distributed import run_continual_parallel

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id() or "local"
    cfg = spec.config(config)
    node_id = ray.get_runtime_context().get_node_id()
    root = Path(spec.work_root or tempfile.gettempdir()) / "lada-trials" / trial_id
    shutil.rmtree(root, ignore_errors=True)
    workdir = root / "run"
    workdir.mkdir(parents=True)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        checkpoint.to_directory(str(workdir))  # task-NNN/ of the last finished task
    tune_known = _task_index(workdir)  # the last step Tune has recorded (its checkpoint's task)
    stored = newest_stored_checkpoint(spec.results_dir, trial_id)
    if stored is not None and int(stored.name.split("-")[1]) > tune_known:
        for old in workdir.glob("task-*"):
            shutil.rmtree(old)
        shutil.copytree(stored, workdir / stored.name)
    reported = {"count": 0}
    last: dict[str, Any] = {}

    def report(result: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is None:
            tune.report(result)
        else:
            stage = root / "report" / f"step-{result[M.TASK_INDEX]:03d}"
            shutil.copytree(checkpoint_dir, stage / Path(checkpoint_dir).name, copy_function=_link_or_copy)
            try:
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(stage)))
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        reported["count"] += 1
        last["result"] = result

    def on_task_end(te: Any) -> None:
        result = step_result(te.metrics, te.task_index, te.num_tasks, te.seconds, spec.objective)
        result[NODE_ID] = node_id
        result[WORLD_SIZE] = world
        if getattr(te, "resumed", False):
            last["result"] = result
            if te.task_index > tune_known:
                # Done before a driver restart that Tune never recorded: report it again (no training),
                # with the checkpoint on the last such step. MLflow skips steps it already has.
                ckpt = Path(te.checkpoint_dir)
                report(result, ckpt if (ckpt / "state.pt").is_file() else None)
            return
        report(result, Path(te.checkpoint_dir))

    t0 = time.time()
    world = _world_size()
    try:
        run_continual_parallel(cfg, spec.cache_path, workdir, world, on_task_end=on_task_end)
    except DivergenceError as exc:
        # Retrying cannot help (same seed, same data): end the trial with the reason, as a failed value.
        result = dict(last.get("result", {}))
        result.update({OBJECTIVE: math.nan, DIVERGED: 1, ERROR: str(exc), NODE_ID: node_id})
        result.setdefault(TASKS_DONE, 0)
        tune.report(result)
        return
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if reported["count"] == 0 and "result" in last:
        # Every task was already done (the trial finished just before a driver restart): report the
        # final step again so that Tune, Optuna and MLflow see the trial's end.
        final = dict(last["result"])
        final[TASK_SECONDS] = time.time() - t0
        tune.report(final)

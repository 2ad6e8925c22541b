"""What a trial reports, how a trial ended, and the one reader of a sweep's results folder.

- The result schema: the keys of one task step's result (besides ``lada_core.metrics``'s metric names
  and :data:`sweeps.objective.OBJECTIVE`), defined once here.
- :func:`classify`: the one rule for how a trial ended (completed / pruned / failed / diverged, and
  "not run"), used by the Optuna searcher, the MLflow tracker, the summary and the MLflow sync;
  :func:`optuna_state` and :func:`mlflow_status` say how each reader records it.
- :func:`read_results`: the one reader of Ray's results folder (``<trial folder>/result.json``, one
  JSON object a line). Ray's results are at-least-once: after a lost node or a killed driver a task
  step can be there twice, the repeat marked ``replayed=1``. The reader keeps each task step once
  (the first), so everything built on it (the report, the MLflow sync, the tracker's backfill) shows
  every task step exactly once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lada_core import metrics as M
from sweeps.objective import OBJECTIVE

# -- the result schema of one task step ------------------------------------------------------------
TASK_INDEX = M.TASK_INDEX
TASKS_DONE = "tasks_done"
NUM_TASKS = "num_tasks"
TASK_SECONDS = "task_seconds"
DIVERGED = "diverged"
NODE_ID = "node_id"
WORLD_SIZE = "world_size"
ERROR = "error_message"
REPLAYED = "replayed"
"""1 on a step a restarted driver's trial reports again from a stored checkpoint, without training
(the killed driver had it done but Tune's saved state did not): its ``task_seconds`` is 0."""
STORAGE_ERROR = "storage_error"
"""Result key of a trial that could not write to storage (its value: a one-line message)."""
RESULT_FILE = "result.json"

# -- outcomes ----------------------------------------------------------------------------------------
COMPLETED = "completed"
PRUNED = "pruned"
FAILED = "failed"
DIVERGED_OUTCOME = "diverged"
NOT_RUN = "not run"
STOPPED = "stopped"
"""Only in a summary of a sweep a storage failure stopped: an unfinished trial, resumable."""
OUTCOMES = (COMPLETED, PRUNED, FAILED, DIVERGED_OUTCOME, NOT_RUN)


def classify(result: Mapping[str, Any] | None, error: bool = False, metric: str = OBJECTIVE,
             num_tasks: int | None = None) -> str:
    """How a trial ended, from its last result and whether it raised: ``failed`` (it raised, or its
    last task gave no finite objective), ``diverged`` (the trainer stopped it at a NaN/inf loss),
    ``pruned`` (stopped before its last task, by ASHA or a time budget), ``not run`` (no task
    finished), ``completed``. ``num_tasks``: the sweep's task count when the result lacks it."""
    if error:
        return FAILED
    if not result:
        return NOT_RUN
    if result.get(DIVERGED):
        return DIVERGED_OUTCOME
    done = int(result.get(TASKS_DONE) or 0)
    total = result.get(NUM_TASKS, num_tasks)
    if total is not None and done < int(total):
        return PRUNED if done > 0 else NOT_RUN
    value = result.get(metric)
    if value is None or not math.isfinite(float(value)):
        return FAILED
    return COMPLETED


def optuna_state(outcome: str) -> str:
    """The Optuna ``TrialState`` name a trial that ended so is told as (a pruned trial stays PRUNED,
    a diverged one FAIL; a trial that never finished a task is PRUNED, with no value)."""
    return {COMPLETED: "COMPLETE", PRUNED: "PRUNED", NOT_RUN: "PRUNED"}.get(outcome, "FAIL")


def from_optuna_state(state: str | None, last: Mapping[str, Any] | None) -> str | None:
    """The outcome of a trial the Optuna study has finished (None while it has not)."""
    if state == "COMPLETE":
        return COMPLETED
    if state == "PRUNED":
        return PRUNED
    if state == "FAIL":
        return DIVERGED_OUTCOME if (last or {}).get(DIVERGED) else FAILED
    return None


def mlflow_status(outcome: str) -> str:
    """The MLflow run status of a trial that ended so."""
    return "FAILED" if outcome in (FAILED, DIVERGED_OUTCOME) else "FINISHED"


# -- the reader --------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a file, one a line (a line cut short by a crash is skipped)."""
    out: list[dict[str, Any]] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            out.append(row)
    return out


def task_steps(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The task-step rows, each task step once (the first report of it; a replay is dropped)."""
    seen: set[int] = set()
    out = []
    for r in rows:
        if TASK_INDEX not in r:
            continue
        step = int(r[TASK_INDEX])
        if step not in seen:
            seen.add(step)
            out.append(dict(r))
    return out


def trial_steps(trial_dir: str | Path) -> list[dict[str, Any]]:
    """The task steps of one trial folder (each once)."""
    return task_steps(read_jsonl(Path(trial_dir) / RESULT_FILE))


@dataclass
class TrialRecord:
    """What Ray's results folder holds of one trial."""

    trial_id: str
    dir: Path
    rows: list[dict[str, Any]]  # every row Ray wrote, as written (replays included)
    config: dict[str, Any]
    checkpoint: Path | None = None  # the newest checkpoint folder
    error: str | None = None  # the last line of error.txt, if the trial ended in error (not a failure Tune retried)
    steps: list[dict[str, Any]] = field(default_factory=list)  # task steps, each once

    @property
    def last(self) -> dict[str, Any]:
        """The last result Ray recorded (what Tune's ``Result.metrics`` holds)."""
        return self.rows[-1] if self.rows else {}


def read_results(folder: str | Path) -> dict[str, TrialRecord]:
    """Every trial of a local (or shared-folder) sweep, by trial id."""
    from sweeps import ray_compat

    out: dict[str, TrialRecord] = {}
    root = Path(folder)
    # Ray keeps a retried trial's error.txt: its status in the experiment state says whether it ended so
    statuses = ray_compat.saved_tune_trials(root) if root.is_dir() else None
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not d.is_dir() or not (d / "params.json").is_file() and not (d / RESULT_FILE).is_file():
            continue
        rows = read_jsonl(d / RESULT_FILE)
        tid = (rows[0].get("trial_id") if rows else None) or ray_compat.trial_id_of_dir(d.name)
        if not tid:
            continue
        try:
            config = json.loads((d / "params.json").read_text())
        except (OSError, json.JSONDecodeError):
            config = rows[-1].get("config", {}) if rows else {}
        ckpts = sorted((p for p in d.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name)
        error = _last_error_line(d)
        if statuses is not None and statuses.get(str(tid), "ERROR") != "ERROR":
            error = None  # the failure was retried and the trial went on
        out[str(tid)] = TrialRecord(str(tid), d, rows, config, ckpts[-1] if ckpts else None, error, task_steps(rows))
    return out


def _last_error_line(d: Path) -> str | None:
    try:
        lines = [x for x in (d / "error.txt").read_text().splitlines() if x.strip()]
    except OSError:
        return None
    return lines[-1][:4000] if lines else None

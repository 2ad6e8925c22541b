"""The driver-side Tune callback that records a sweep in MLflow (Tune events only; the I/O is the
writer's, :mod:`sweeps.tracking.writer`). See :mod:`sweeps.tracking`."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from lada_core import metrics as M
from sweeps.recovery import newest_into
from sweeps.results import DIVERGED_OUTCOME, ERROR, FAILED, TASKS_DONE, classify, mlflow_status
from sweeps.tracking.artifacts import outcome_tags, step_metrics, write_trial_end
from sweeps.tracking.store import (
    ACC_PREFIX,
    MAX_BATCH,
    PARENT_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    _param_value,
    close_orphans,
    running_children,
)
from sweeps.tracking.writer import MlflowWriter

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient
    from ray.tune.experiment import Trial

logger = logging.getLogger("sweeps.tracking")


def _timed(fn: Any) -> Any:
    """Add the hook's wall time to ``self.seconds`` (the callback runs in Tune's driver loop)."""
    import functools

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0

    return wrapper


class MlflowTracker(Callback):
    """Driver-side MLflow logging of a Tune sweep; see the module docstring."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        sweep_name: str = "",
        spec: Any = None,
        flush_interval_s: float = 5.0,
        flush_size: int = MAX_BATCH,
        log_checkpoint: bool = True,
        extra_tags: Mapping[str, str] | None = None,
        background: bool = True,
        retry_after_s: float = 30.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep_name = sweep_name
        self.spec = spec
        self.flush_interval_s = flush_interval_s
        self.flush_size = flush_size
        self.log_checkpoint = log_checkpoint
        self.extra_tags = dict(extra_tags or {})
        self.writer = MlflowWriter(tracking_uri, sweep_name, background=background, retry_after_s=retry_after_s)
        # Persistent state (get_state / set_state).
        self.runs: dict[str, str] = {}  # trial id -> run id
        self.last_step: dict[str, int] = {}  # trial id -> last task index logged
        self.rows: dict[str, dict[int, list[float]]] = {}  # trial id -> task index -> accuracy row
        self.columns: dict[str, list[str]] = {}  # trial id -> dataset names
        self.finished: set[str] = set()
        self._synced: set[str] = set()  # per process, from here on
        self._children: dict[str, str] | None = None
        self._orphans_checked = False
        self.seconds = 0.0  # driver time spent in this callback (MLflow calls, artifacts, plots)

    # -- state ---------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_synced=set(), _children=None, _orphans_checked=False, seconds=0.0)
        return state

    def get_state(self) -> dict[str, Any]:
        return {
            "runs": dict(self.runs),
            "last_step": dict(self.last_step),
            "rows": {t: {int(k): list(v) for k, v in r.items()} for t, r in self.rows.items()},
            "columns": dict(self.columns),
            "finished": sorted(self.finished),
            "parent_run_id": self.parent_run_id,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.runs = dict(state.get("runs", {}))
        self.last_step = {k: int(v) for k, v in state.get("last_step", {}).items()}
        self.rows = {t: {int(k): list(v) for k, v in r.items()} for t, r in state.get("rows", {}).items()}
        self.columns = dict(state.get("columns", {}))
        self.finished = set(state.get("finished", []))
        self._synced = set()

    # -- the writer (one queue, one thread) -------------------------------------------------------
    @property
    def client(self) -> MlflowClient:
        return self.writer.client

    @property
    def calls(self) -> int:
        """MLflow requests made (for the overhead figures)."""
        return self.writer.calls

    def available(self) -> bool:
        return self.writer.available()

    def unsent(self) -> tuple[int, int]:
        return self.writer.unsent()

    def flush(self) -> bool:
        return self.writer.flush()

    def drain(self) -> None:
        self.writer.drain()

    # -- runs ------------------------------------------------------------------------------------
    def _existing_children(self) -> dict[str, str] | None:
        """Child runs of the parent by trial id (found once per driver process; None if MLflow failed)."""
        if self._children is None:
            children: dict[str, str] = {}
            try:
                runs = self.client.search_runs(
                    [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'", max_results=5000
                )
                self.writer.calls += 1
                for r in sorted(runs, key=lambda r: r.info.start_time or 0):
                    tid = r.data.tags.get(TRIAL_ID_TAG)
                    if tid:
                        children.setdefault(tid, r.info.run_id)
            except Exception as exc:
                self.writer.mark_down(exc)
                return None
            self._children = children
        return self._children

    def run_id_for(self, trial: Trial) -> str | None:
        """The trial's child run: the known one, a run tagged with its id, or a new one (None while
        MLflow is unreachable: it is created, and filled from Ray's results, once it is back)."""
        tid = trial.trial_id
        if not self.available():
            return self.runs.get(tid)
        run_id = self.runs.get(tid)
        if run_id is None:
            children = self._existing_children()
            if children is None:  # unknown whether the trial has a run: never create a second one
                return None
            run_id = children.get(tid)
        try:
            if run_id is None:
                from mlflow.entities import Param, RunTag

                run = self.client.create_run(
                    self.experiment_id,
                    run_name=trial.trial_name if hasattr(trial, "trial_name") else str(trial),
                    tags={PARENT_TAG: self.parent_run_id, TRIAL_ID_TAG: tid, SWEEP_TAG: self.sweep_name, **self.extra_tags},
                )
                self.writer.calls += 1
                run_id = run.info.run_id
                params = [Param(str(k), _param_value(v)) for k, v in sorted((trial.config or {}).items())]
                for i in range(0, len(params), 100):
                    self.client.log_batch(run_id, params=params[i : i + 100], tags=[RunTag("lada.trial_name", str(trial))] if i == 0 else [])
                    self.writer.calls += 1
                self._synced.add(tid)
                self.runs[tid] = run_id
                if self._children is not None:
                    self._children[tid] = run_id
                # A run created late (MLflow was down when the trial started): the steps so far.
                self._backfill(trial, run_id)
            elif tid not in self._synced:
                # A resumed trial: continue its run; never log a task step twice.
                run = self.client.get_run(run_id)
                self.writer.calls += 1
                # MLflow is the truth of what was logged: a killed driver may have saved a state
                # whose queued metrics never reached MLflow.
                logged = run.data.metrics.get(M.TASK_INDEX)
                self.last_step[tid] = int(logged) if logged is not None else -1
                if run.info.status != "RUNNING" and tid not in self.finished:
                    self.client.update_run(run_id, status="RUNNING")
                    self.writer.calls += 1
                self._synced.add(tid)
                self.runs[tid] = run_id
                self._backfill(trial, run_id)
        except Exception as exc:
            self.writer.mark_down(exc)
            logger.info("MLflow: could not open the run of trial %s: %s", tid, exc)
            return self.runs.get(tid)
        self.writer.mark_up()
        self.runs[tid] = run_id
        return run_id

    # -- Tune hooks ----------------------------------------------------------------------------
    @_timed
    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if self._orphans_checked or not self.available():
            return
        self._orphans_checked = True
        try:
            running = running_children(self.client, self.experiment_id, self.parent_run_id)
            closed = close_orphans(self.client, self.experiment_id, self.parent_run_id, [t.trial_id for t in trials], running)
            self.writer.calls += 1 + len(closed)
            if closed:
                logger.info("MLflow: closed %d runs of trials that a stopped driver never saved", len(closed))
            ended = self._close_ended(trials, running)
            if ended:
                logger.info("MLflow: closed %d runs of trials that ended before a stopped driver closed them", ended)
        except Exception as exc:
            self.writer.mark_down(exc)
            self._orphans_checked = False

    def _close_ended(self, trials: list[Trial], running: list[Any]) -> int:
        """Close the ``running`` runs of trials Tune restored as ended (a driver killed after a
        trial's last result but before its run was closed; Tune never runs such a trial again, so no
        hook would close it): the steps MLflow lacks from ``result.json``, then the trial's end, as
        ``on_trial_complete`` / ``on_trial_error`` write it. Returns how many runs it closed."""
        ended = {t.trial_id: t for t in trials if getattr(t, "status", None) in ("TERMINATED", "ERROR")}
        n = 0
        for r in running:
            trial = ended.get(r.data.tags.get(TRIAL_ID_TAG, ""))
            if trial is None:
                continue
            self.runs[trial.trial_id] = r.info.run_id
            self.finished.discard(trial.trial_id)
            self.run_id_for(trial)  # what MLflow has, and the steps it lacks from result.json
            if trial.status == "ERROR":
                self._end_with_error(trial)
            else:
                self._end(trial)
            n += 1
        return n

    @_timed
    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.finished.discard(trial.trial_id)
        self.run_id_for(trial)

    def _backfill(self, trial: Trial, run_id: str) -> None:
        """Queue the steps Tune recorded (the trial's ``result.json``) that MLflow lacks: results a
        killed driver had received but not sent yet."""
        from sweeps.results import RESULT_FILE, trial_steps

        for base in (getattr(trial, "local_path", None), getattr(trial, "path", None)):
            if not base or "://" in str(base) or not (Path(base) / RESULT_FILE).is_file():
                continue
            for res in trial_steps(base):
                self._queue(trial.trial_id, run_id, res)
            return

    @_timed
    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        tid = trial.trial_id
        if M.TASK_INDEX not in result:
            return
        self._record_row(tid, result)  # the matrix, even while MLflow is unreachable
        run_id = self.runs.get(tid) or self.run_id_for(trial)
        if run_id is None:
            return
        self._queue(tid, run_id, result)
        if self.writer.unsent()[0] >= self.flush_size:
            self.flush()

    def _record_row(self, tid: str, result: Mapping[str, Any]) -> None:
        accs = [k for k in result if k.startswith(ACC_PREFIX)]
        if accs:
            self.columns.setdefault(tid, [k[len(ACC_PREFIX):] for k in accs])
            self.rows.setdefault(tid, {})[int(result[M.TASK_INDEX])] = [float(result[k]) for k in accs]

    def _queue(self, tid: str, run_id: str, result: Mapping[str, Any]) -> None:
        step = int(result[M.TASK_INDEX])
        self._record_row(tid, result)
        if step <= self.last_step.get(tid, -1):
            return
        from mlflow.entities import Metric

        ts = int(1000 * float(result.get("timestamp", time.time())))
        items = [(run_id, Metric(key, value, ts, step)) for key, value in step_metrics(result).items()]
        items.append((run_id, Metric(M.TASK_INDEX, float(step), ts, step)))
        self.writer.enqueue(items)
        self.last_step[tid] = step

    @_timed
    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if self.writer.has_deferred() and self.available():
            self._retry_deferred()
        if self.writer.due(self.flush_interval_s):
            self.flush()

    def _retry_deferred(self) -> None:
        for trial, status, outcome, message in self.writer.take_deferred():
            self.finish(trial, status, outcome, message)

    @_timed
    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._end(trial)

    def _end(self, trial: Trial) -> None:
        result = trial.last_result or {}
        outcome = classify(result)
        message = ""
        if outcome == DIVERGED_OUTCOME:
            message = str(result.get(ERROR, "training diverged"))
        elif outcome == FAILED:
            message = str(result.get(ERROR, "the last task gave no finite objective"))
        self.finish(trial, mlflow_status(outcome), outcome, message)

    @_timed
    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._end_with_error(trial)

    def _end_with_error(self, trial: Trial) -> None:
        message = ""
        try:
            err = trial.get_error()
            message = str(err).strip().splitlines()[-1] if err else ""
        except Exception:
            pass
        self.finish(trial, mlflow_status(FAILED), FAILED, message or "the trial raised an error")

    @_timed
    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self.flush()
        self.drain()
        if any(self.unsent()):
            # MLflow was down: one last try now, whatever the retry timer says.
            self.writer.retry_now()
            self._retry_deferred()
            self.flush()
        self.writer.close()
        pending, deferred = self.unsent()
        if pending or deferred:
            logger.warning(
                "MLflow at %s: %d metric points and %d trial ends were not written (unreachable); Ray's results hold them: "
                "python -m sweeps.report --name %s --sync-mlflow writes them once MLflow is back",
                self.tracking_uri, pending, deferred, self.sweep_name or "NAME",
            )

    def finish(self, trial: Trial, status: str, outcome: str, message: str = "") -> None:
        """End a trial's run: flush, matrix artifacts, config, checkpoint, outcome tags, status. While
        MLflow is unreachable the end is kept and written when a retry succeeds."""
        tid = trial.trial_id
        self.finished.add(tid)
        run_id = self.runs.get(tid) or self.run_id_for(trial)
        self.flush()
        if run_id is None or not self.available():
            self.writer.defer(tid, (trial, status, outcome, message))
            return
        # Everything read from the trial is taken now; the I/O runs on the MLflow thread.
        rows = dict(self.rows.get(tid) or {})
        names = list(self.columns.get(tid) or [])
        config_yaml = None
        if self.spec is not None:
            try:
                from lada_core.config import config_to_yaml

                config_yaml = config_to_yaml(self.spec.config(trial.config))
            except Exception as exc:  # an invalid sample: the trial failed for that reason
                logger.debug("no config.yaml for %s: %s", tid, exc)
        checkpoint = trial.checkpoint if self.log_checkpoint else None
        tags = outcome_tags(outcome, (trial.last_result or {}).get(TASKS_DONE), message)
        self.writer.submit(self._finish_io, trial, run_id, status, outcome, message, tags, rows, names, config_yaml, checkpoint)

    def _finish_io(self, trial: Trial, run_id: str, status: str, outcome: str, message: str, tags: dict[str, str],
                   rows: dict[int, list[float]], names: list[str], config_yaml: str | None, checkpoint: Any) -> None:
        tid = trial.trial_id
        tmp = Path(tempfile.mkdtemp(prefix="lada-mlflow-"))
        try:
            ckpt_dir = None
            if checkpoint is not None:
                ckpt_dir = tmp / "checkpoint"
                checkpoint.to_directory(str(ckpt_dir))
                newest_into(ckpt_dir, getattr(self.spec, "results_dir", None), tid)
            self.writer.calls += write_trial_end(self.client, run_id, status, tags, rows, names, config_yaml, ckpt_dir)
            self.writer.mark_up()
        except Exception as exc:
            self.writer.mark_down(exc)
            logger.info("MLflow: could not finish the run of trial %s (kept for a retry): %s", tid, exc)
            self.writer.defer(tid, (trial, status, outcome, message))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

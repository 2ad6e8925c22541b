"""MLflow tracking of a sweep from the Ray Tune driver.

One parent run per sweep (created by :mod:`sweeps.run`; it holds the space, benchmark, cache key, git
commit and, at the end, the best config and value) and one child run per trial, tagged
``mlflow.parentRunId``. :class:`MlflowTracker` is a driver-side ``tune.Callback``: trials never talk to
MLflow. For every task step it logs the chosen metrics with ``step = task index`` (the means and the
per-dataset accuracies); at the end of a trial, its accuracy matrix as CSV and heatmap PNG, its
resolved config as YAML, its final checkpoint, and the outcome (completed, pruned, diverged, failed).

Logging is batched: metrics are queued and sent with ``log_batch`` (up to 1000 per call) when the
queue is large or a few seconds old, and at every trial end. If the tracking server is unreachable,
the sweep goes on (Ray's results stay the source of truth): the first failed call marks MLflow down
for ``retry_after_s``, during which no call is tried (none blocks Tune's loop); queued metrics and
trial ends are kept and sent once a retry succeeds, runs of trials that started meanwhile are created
then and filled from the trial's ``result.json``. Whatever is still unsent when the sweep ends is
written later by ``python -m sweeps.report --name NAME --sync-mlflow`` (:func:`sync_sweep`), which
compares MLflow with Ray's results and writes only what is missing.

Ray's stock ``MLflowLoggerCallback`` opens unnested runs and, after ``Tuner.restore``, second runs for
resumed trials. Here the trial -> run mapping is part of the callback state (``get_state`` /
``set_state``, saved with the experiment), and runs are also found by their ``lada.trial_id`` tag, so
a resumed or retried trial continues its own child run and never logs a task step twice.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from lada_core import metrics as M
from sweeps.objective import OBJECTIVE
from sweeps.results import DIVERGED_OUTCOME, ERROR, FAILED, TASK_SECONDS, TASKS_DONE, classify, mlflow_status

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient
    from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
TRIAL_ID_TAG = "lada.trial_id"
SWEEP_TAG = "lada.sweep"
OUTCOME_TAG = "lada.outcome"
ACC_PREFIX = "acc/"
STEP_METRICS = (*M.METRICS, M.SEEN_MEAN, OBJECTIVE, TASK_SECONDS)
"""Per-step metric keys logged besides ``acc/<dataset>`` (names shared with the trainer)."""
MATRIX_CSV = "accuracy_matrix.csv"
MATRIX_PNG = "accuracy_matrix.png"
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


def artifact_root_for(tracking_uri: str) -> str | None:
    """Where artifacts go for a local sqlite store: ``mlruns/`` beside the database (absolute), so
    that they do not land relative to whichever process created the experiment. None for a server."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlruns").resolve().as_uri()
    return None


def sqlite_store_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (relative to the working folder when the
    URI is), else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):]).resolve()


@contextlib.contextmanager
def sqlite_store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an exclusive lock (``flock`` on the database's folder) while a sqlite MLflow store is
    opened. MLflow creates and migrates a new store's tables on first use, and two processes doing it
    at the same moment (two sweeps started together in one folder) leave a database that neither can
    open again ("table _alembic_tmp_tags already exists", "duplicate column name"). Other URIs: no lock."""
    path = sqlite_store_path(tracking_uri)
    if path is None:
        yield
        return
    import fcntl
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def open_client(tracking_uri: str) -> MlflowClient:
    """An MLflow client whose store is created (tables made and migrated) under
    :func:`sqlite_store_lock`; afterwards any number of processes may use the store."""
    from mlflow.tracking import MlflowClient

    with sqlite_store_lock(tracking_uri):
        client = MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)  # the store is built on first use
    return client


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    with sqlite_store_lock(tracking_uri):  # two sweeps creating the experiment at once: one creates it
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        return client.create_experiment(name, artifact_location=artifact_root_for(tracking_uri))


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def step_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of one Tune result that go to MLflow (finite numbers only)."""
    out: dict[str, float] = {}
    for key, value in result.items():
        if key in STEP_METRICS or key.startswith(ACC_PREFIX):
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                out[key] = v
    return out


def heatmap_figure(rows: Sequence[Sequence[float]], names: Sequence[str]) -> Any:
    """The accuracy matrix as a heatmap (rows = after step j, columns = dataset t)."""
    import numpy as np
    from matplotlib.figure import Figure

    a = np.asarray(rows, dtype=float)
    fig = Figure(figsize=(1.0 + 0.6 * max(4, a.shape[1]), 1.0 + 0.45 * max(3, a.shape[0])), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(a, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(a.shape[1]), list(names), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(a.shape[0]), [f"after {names[j]}" if j < len(names) else str(j) for j in range(a.shape[0])], fontsize=8)
    for j in range(a.shape[0]):
        for t in range(a.shape[1]):
            ax.text(t, j, f"{a[j, t]:.0f}", ha="center", va="center", fontsize=7, color="w" if a[j, t] < 60 else "k")
    ax.set_title("accuracy (%) on dataset t after step j")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


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
        self.background = background
        self.retry_after_s = retry_after_s
        # Persistent state (get_state / set_state).
        self.runs: dict[str, str] = {}  # trial id -> run id
        self.last_step: dict[str, int] = {}  # trial id -> last task index logged
        self.rows: dict[str, dict[int, list[float]]] = {}  # trial id -> task index -> accuracy row
        self.columns: dict[str, list[str]] = {}  # trial id -> dataset names
        self.finished: set[str] = set()
        # Per process.
        self._client: MlflowClient | None = None
        self._pending: list[tuple[str, Any]] = []
        self._last_flush = time.monotonic()
        self._synced: set[str] = set()
        self._children: dict[str, str] | None = None
        self._orphans_checked = False
        self._executor: Any = None
        self._futures: list[Any] = []
        self._lock = threading.Lock()
        self._down_until = 0.0  # monotonic time before which MLflow is not tried (after a failure)
        self._down_since: float | None = None
        self._deferred: dict[str, tuple[Any, str, str, str]] = {}  # trial id -> a finish not written yet
        self.calls = 0  # MLflow requests made (for the overhead figures)
        self.seconds = 0.0  # driver time spent in this callback (MLflow calls, artifacts, plots)

    # -- state ---------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state["_pending"] = []
        state["_synced"] = set()
        state["_children"] = None
        state["_orphans_checked"] = False
        state["seconds"] = 0.0
        state["calls"] = 0
        state["_executor"] = None
        state["_futures"] = []
        state["_down_until"] = 0.0
        state["_down_since"] = None
        state["_deferred"] = {}
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

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

    # -- availability ----------------------------------------------------------------------------
    def available(self) -> bool:
        """False while MLflow is considered down (a call failed less than ``retry_after_s`` ago)."""
        return time.monotonic() >= self._down_until

    def _mark_down(self, exc: BaseException) -> None:
        first = self._down_since is None
        self._down_until = time.monotonic() + self.retry_after_s
        if first:
            self._down_since = time.time()
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            logger.warning(
                "MLflow at %s is unreachable (%s); the sweep goes on, Ray keeps every result; retrying every %.0fs "
                "(anything still missing at the end: python -m sweeps.report --name %s --sync-mlflow)",
                self.tracking_uri, text, self.retry_after_s, self.sweep_name or "NAME",
            )

    def _mark_up(self) -> None:
        if self._down_since is not None:
            logger.warning("MLflow at %s is reachable again; sending what was queued", self.tracking_uri)
        self._down_since = None
        self._down_until = 0.0

    def unsent(self) -> tuple[int, int]:
        """(metric points queued, trial ends not written) - nonzero only if MLflow was unreachable."""
        with self._lock:
            return len(self._pending), len(self._deferred)

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    # -- runs ------------------------------------------------------------------------------------
    def _existing_children(self) -> dict[str, str] | None:
        """Child runs of the parent by trial id (found once per driver process; None if MLflow failed)."""
        if self._children is None:
            children: dict[str, str] = {}
            try:
                runs = self.client.search_runs(
                    [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'", max_results=5000
                )
                self.calls += 1
                for r in sorted(runs, key=lambda r: r.info.start_time or 0):
                    tid = r.data.tags.get(TRIAL_ID_TAG)
                    if tid:
                        children.setdefault(tid, r.info.run_id)
            except Exception as exc:
                self._mark_down(exc)
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
                self.calls += 1
                run_id = run.info.run_id
                params = [Param(str(k), _param_value(v)) for k, v in sorted((trial.config or {}).items())]
                for i in range(0, len(params), 100):
                    self.client.log_batch(run_id, params=params[i : i + 100], tags=[RunTag("lada.trial_name", str(trial))] if i == 0 else [])
                    self.calls += 1
                self._synced.add(tid)
                self.runs[tid] = run_id
                if self._children is not None:
                    self._children[tid] = run_id
                # A run created late (MLflow was down when the trial started): the steps so far.
                self._backfill(trial, run_id)
            elif tid not in self._synced:
                # A resumed trial: continue its run; never log a task step twice.
                run = self.client.get_run(run_id)
                self.calls += 1
                # MLflow is the truth of what was logged: a killed driver may have saved a state
                # whose queued metrics never reached MLflow.
                logged = run.data.metrics.get(M.TASK_INDEX)
                self.last_step[tid] = int(logged) if logged is not None else -1
                if run.info.status != "RUNNING" and tid not in self.finished:
                    self.client.update_run(run_id, status="RUNNING")
                    self.calls += 1
                self._synced.add(tid)
                self.runs[tid] = run_id
                self._backfill(trial, run_id)
        except Exception as exc:
            self._mark_down(exc)
            logger.info("MLflow: could not open the run of trial %s: %s", tid, exc)
            return self.runs.get(tid)
        self._mark_up()
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
            self.calls += 1 + len(closed)
            if closed:
                logger.info("MLflow: closed %d runs of trials that a stopped driver never saved", len(closed))
            ended = self._close_ended(trials, running)
            if ended:
                logger.info("MLflow: closed %d runs of trials that ended before a stopped driver closed them", ended)
        except Exception as exc:
            self._mark_down(exc)
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
        if len(self._pending) >= self.flush_size:
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
        with self._lock:
            self._pending.extend(items)
        self.last_step[tid] = step

    @_timed
    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if self._deferred and self.available():
            self._retry_deferred()
        if self._pending and time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def _retry_deferred(self) -> None:
        with self._lock:
            deferred, self._deferred = dict(self._deferred), {}
        for trial, status, outcome, message in deferred.values():
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
        if self._deferred or self._pending:
            # MLflow was down: one last try now, whatever the retry timer says.
            self._down_until = 0.0
            self._retry_deferred()
            self.flush()
            self.drain()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        pending, deferred = self.unsent()
        if pending or deferred:
            logger.warning(
                "MLflow at %s: %d metric points and %d trial ends were not written (unreachable); Ray's results hold them: "
                "python -m sweeps.report --name %s --sync-mlflow writes them once MLflow is back",
                self.tracking_uri, pending, deferred, self.sweep_name or "NAME",
            )

    # -- writing ---------------------------------------------------------------------------------
    # -- writing (on one background thread: MLflow I/O stays off Tune's driver loop) -------------
    def _submit(self, fn: Any, *args: Any) -> None:
        if not self.background:
            fn(*args)
            return
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lada-mlflow")
        self._futures = [f for f in self._futures if not f.done()]
        self._futures.append(self._executor.submit(fn, *args))

    def drain(self) -> None:
        """Wait for the background MLflow work (at the end of the experiment)."""
        for f in list(self._futures):
            try:
                f.result()
            except Exception as exc:  # pragma: no cover - the jobs log their own errors
                logger.warning("MLflow: background work failed: %s", exc)
        self._futures = []

    def flush(self) -> bool:
        """Send the queued metrics (grouped per run, 1000 per call). False if MLflow failed (the
        metrics stay queued for a retry); with ``background`` the sending is queued and True returned."""
        self._last_flush = time.monotonic()
        if not self.available():
            return False  # kept queued until a retry
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return True
        if self.background:
            self._submit(self._send, batch)
            return True
        return self._send(batch)

    def _send(self, batch: list[tuple[str, Any]]) -> bool:
        by_run: dict[str, list[Any]] = {}
        for run_id, metric in batch:
            by_run.setdefault(run_id, []).append(metric)
        ok = True
        for run_id, items in by_run.items():
            try:
                for i in range(0, len(items), MAX_BATCH):
                    self.client.log_batch(run_id, metrics=items[i : i + MAX_BATCH])
                    self.calls += 1
            except Exception as exc:
                ok = False
                self._mark_down(exc)
                logger.info("MLflow: could not log %d metrics of run %s (kept for a retry): %s", len(items), run_id, exc)
                with self._lock:
                    self._pending[:0] = [(run_id, m) for m in items]
        if ok:
            self._mark_up()
        return ok

    def finish(self, trial: Trial, status: str, outcome: str, message: str = "") -> None:
        """End a trial's run: flush, matrix artifacts, config, checkpoint, outcome tags, status. While
        MLflow is unreachable the end is kept and written when a retry succeeds."""
        tid = trial.trial_id
        self.finished.add(tid)
        run_id = self.runs.get(tid) or self.run_id_for(trial)
        self.flush()
        if run_id is None or not self.available():
            with self._lock:
                self._deferred[tid] = (trial, status, outcome, message)
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
        self._submit(self._finish_io, trial, run_id, status, outcome, message, tags, rows, names, config_yaml, checkpoint)

    def _finish_io(self, trial: Trial, run_id: str, status: str, outcome: str, message: str, tags: dict[str, str],
                   rows: dict[int, list[float]], names: list[str], config_yaml: str | None, checkpoint: Any) -> None:
        tid = trial.trial_id
        tmp = Path(tempfile.mkdtemp(prefix="lada-mlflow-"))
        try:
            ckpt_dir = None
            if checkpoint is not None:
                ckpt_dir = tmp / "checkpoint"
                checkpoint.to_directory(str(ckpt_dir))
                _newest_into(ckpt_dir, getattr(self.spec, "results_dir", None), tid)
            self.calls += write_trial_end(self.client, run_id, status, tags, rows, names, config_yaml, ckpt_dir)
            self._mark_up()
        except Exception as exc:
            self._mark_down(exc)
            logger.info("MLflow: could not finish the run of trial %s (kept for a retry): %s", tid, exc)
            with self._lock:
                self._deferred[tid] = (trial, status, outcome, message)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _newest_into(ckpt_dir: Path, results_dir: str | None, trial_id: str) -> None:
    """Put the trial's newest stored task checkpoint in ``ckpt_dir`` when it is newer than the one
    Tune holds (Tune lost the last one's registration with the worker: see
    :class:`sweeps.storage.ResultLedger`)."""
    from sweeps.trainable import _task_index, newest_stored_checkpoint

    newest = newest_stored_checkpoint(results_dir, trial_id, newer_than=_task_index(ckpt_dir))
    if newest is not None:
        shutil.rmtree(ckpt_dir)
        shutil.copytree(newest, ckpt_dir / newest.name)


def outcome_tags(outcome: str, tasks_done: Any, message: str = "") -> dict[str, str]:
    """The tags that close a trial's run: its outcome, tasks done and, for a failure, the reason."""
    tags = {OUTCOME_TAG: outcome}
    if tasks_done is not None:
        tags["lada.tasks_done"] = str(tasks_done)
    if message:
        tags["lada.error"] = message[:4000]
    return tags


def matrix_csv(rows: Mapping[int, Sequence[float]], names: Sequence[str]) -> str:
    lines = ["step," + ",".join(names)]
    for k in sorted(rows):
        lines.append(f"{names[k] if k < len(names) else k}," + ",".join(f"{v:.4f}" for v in rows[k]))
    return "\n".join(lines) + "\n"


def write_trial_end(client: MlflowClient, run_id: str, status: str, tags: Mapping[str, str], rows: Mapping[int, Sequence[float]],
                    names: Sequence[str], config_yaml: str | None, checkpoint_dir: str | Path | None) -> int:
    """Write a trial's end to its run (matrix CSV and heatmap, config YAML, checkpoint folder, tags,
    status); returns the number of MLflow calls. Idempotent: artifacts are overwritten in place."""
    from mlflow.entities import RunTag

    calls = 0
    tmp = Path(tempfile.mkdtemp(prefix="lada-mlflow-"))
    try:
        if rows and names:
            (tmp / MATRIX_CSV).write_text(matrix_csv(rows, names))
            heatmap_figure([rows[k] for k in sorted(rows)], names).savefig(tmp / MATRIX_PNG, dpi=100)
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        if any(tmp.iterdir()):
            client.log_artifacts(run_id, str(tmp))
            calls += 1
        if checkpoint_dir is not None and Path(checkpoint_dir).is_dir():
            client.log_artifacts(run_id, str(checkpoint_dir), artifact_path="checkpoint")
            calls += 1
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        client.set_terminated(run_id, status=status)
        calls += 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return calls


def _param_value(value: Any) -> str:
    text = "None" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))
    return text[:6000]


def running_children(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Any]:
    """The parent's child runs still RUNNING."""
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'", max_results=5000
    )


def close_orphans(client: MlflowClient, experiment_id: str, parent_run_id: str, keep: Iterable[str],
                  runs: list[Any] | None = None) -> list[str]:
    """Mark KILLED the child runs still RUNNING (``runs``, or found here) whose trial is not in
    ``keep`` (trials a killed driver created after its last saved state: Tune will not resume them)."""
    keep = set(keep)
    out = []
    if runs is None:
        runs = running_children(client, experiment_id, parent_run_id)
    for r in runs:
        if r.data.tags.get(TRIAL_ID_TAG) not in keep:
            client.set_terminated(r.info.run_id, status="KILLED")
            out.append(r.info.run_id)
    return out


# -- catching up with Ray's results (``python -m sweeps.report --sync-mlflow``) ---------------------


def sync_sweep(settings: Any, log: Any = None) -> dict[str, int]:
    """Write to MLflow what it lacks of a sweep, from Ray's results (the source of truth, read by
    :func:`sweeps.results.read_results`: each task step once): child runs of trials that have none,
    task steps not logged yet (by ``task_index`` history: never twice), the end of finished trials
    whose run was not closed, and the parent run's end once the sweep has a ``summary.json``. A
    second call writes nothing. Returns counts of what was written."""
    from sweeps.results import read_results

    log = log or (lambda m: None)
    counts = {"runs_created": 0, "metrics_logged": 0, "runs_closed": 0, "parent_closed": 0, "duplicate_runs": 0}
    if not settings.parent_run_id:
        raise ValueError(f"sweep {settings.name} has no parent run (it stopped before MLflow was reached)")
    client = open_client(settings.mlflow_uri)
    parent = client.get_run(settings.parent_run_id)
    by_trial = _runs_by_trial(client, parent.info.experiment_id, settings.parent_run_id, counts)
    folder = Path(settings.folder)
    summary = _read_summary(folder)
    outcomes = _known_outcomes(settings, summary, log)
    spec = None
    try:
        spec = settings.trial_spec()
    except Exception as exc:
        log(f"no config for config.yaml: {exc}")
    for tid, rec in read_results(folder).items():
        _sync_trial(client, settings, parent.info.experiment_id, rec, by_trial.get(tid), outcomes(tid, rec), spec, counts)
    if summary is not None and (parent.info.status == "RUNNING" or "trials_completed" not in parent.data.metrics):
        _close_parent(client, settings, folder, summary)
        counts["parent_closed"] = 1
    return counts


def _runs_by_trial(client: MlflowClient, exp_id: str, parent_run_id: str, counts: dict[str, int]) -> dict[str, Any]:
    """The child runs of the sweep by trial id (the oldest one; more than one is counted)."""
    runs = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=5000)
    by_trial: dict[str, Any] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        tid = r.data.tags.get(TRIAL_ID_TAG)
        if tid in by_trial:
            counts["duplicate_runs"] += 1
        elif tid:
            by_trial[tid] = r
    return by_trial


def _read_summary(folder: Path) -> dict[str, Any] | None:
    import json

    from sweeps.settings import SUMMARY_FILE

    f = folder / SUMMARY_FILE
    return json.loads(f.read_text()) if f.is_file() else None  # type: ignore[no-any-return]


def _known_outcomes(settings: Any, summary: dict[str, Any] | None, log: Any) -> Any:
    """``outcome(trial id, record)``: how a trial ended, from the summary, else the Optuna study
    (None while it has not ended; a trial that never finished a task has an outcome only if it
    failed)."""
    from sweeps.optuna_storage import RAY_TRIAL_ID_ATTR, load_study
    from sweeps.results import FAILED, NOT_RUN, from_optuna_state

    summary_rows = {str(r["trial_id"]): r["outcome"] for r in (summary or {}).get("rows", [])}
    study_states: dict[str, str] = {}
    try:
        for t in load_study(settings.study_storage, settings.name).get_trials(deepcopy=False):
            if t.user_attrs.get(RAY_TRIAL_ID_ATTR):
                study_states[t.user_attrs[RAY_TRIAL_ID_ATTR]] = t.state.name
    except Exception as exc:  # no study (yet): outcomes from summary.json only
        log(f"no Optuna study: {exc}")

    def outcome(tid: str, rec: Any) -> str | None:
        found = summary_rows.get(tid) or from_optuna_state(study_states.get(tid), rec.last)
        if found == NOT_RUN:
            return FAILED if rec.error else None
        return found

    return outcome


def _sync_trial(client: MlflowClient, settings: Any, exp_id: str, rec: Any, run: Any, outcome: str | None, spec: Any,
                counts: dict[str, int]) -> None:
    """One trial: its run (created if missing), the steps it lacks, its end once it has ended."""
    from mlflow.entities import Metric, Param

    if not rec.steps and outcome is None:
        return  # nothing Ray holds that MLflow could lack
    if run is None:
        name = rec.dir.name.split("_lada")[0] if "_lada" in rec.dir.name else rec.dir.name[:60]
        run_id = client.create_run(exp_id, run_name=name[:250], tags={
            PARENT_TAG: settings.parent_run_id, TRIAL_ID_TAG: rec.trial_id, SWEEP_TAG: settings.name,
            "lada.space": settings.space, "lada.synced_from": "ray-results",
        }).info.run_id
        params = [Param(str(k), _param_value(v)) for k, v in sorted((rec.config or {}).items())]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        counts["runs_created"] += 1
        logged_steps: set[int] = set()
        status, tags = "RUNNING", {}
    else:
        run_id = run.info.run_id
        logged_steps = {int(m.step) for m in client.get_metric_history(run_id, M.TASK_INDEX)}
        status, tags = run.info.status, run.data.tags
    metrics = []
    for r in rec.steps:
        step = int(r[M.TASK_INDEX])
        if step not in logged_steps:
            ts = int(1000 * float(r.get("timestamp", time.time())))
            metrics += [Metric(k, v, ts, step) for k, v in step_metrics(r).items()]
            metrics.append(Metric(M.TASK_INDEX, float(step), ts, step))
    for i in range(0, len(metrics), MAX_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_BATCH])
    counts["metrics_logged"] += len(metrics)
    if outcome is not None and (status == "RUNNING" or OUTCOME_TAG not in tags):
        _close_trial_run(client, run_id, rec, outcome, spec)
        counts["runs_closed"] += 1


def _close_trial_run(client: MlflowClient, run_id: str, rec: Any, outcome: str, spec: Any) -> None:
    matrix: dict[int, list[float]] = {}
    names: list[str] = []
    for r in rec.steps:
        accs = [k for k in r if k.startswith(ACC_PREFIX)]
        names = names or [k[len(ACC_PREFIX):] for k in accs]
        matrix[int(r[M.TASK_INDEX])] = [float(r[k]) for k in accs]
    config_yaml = None
    if spec is not None:
        try:
            from lada_core.config import config_to_yaml

            config_yaml = config_to_yaml(spec.config(rec.config or {}))
        except Exception:
            config_yaml = None
    status = mlflow_status(outcome)
    message = str(rec.last.get(ERROR) or rec.error or "") if status == "FAILED" else ""
    write_trial_end(client, run_id, status, outcome_tags(outcome, rec.last.get(TASKS_DONE), message), matrix, names,
                    config_yaml, rec.checkpoint)


def _close_parent(client: MlflowClient, settings: Any, folder: Path, summary: dict[str, Any]) -> None:
    from sweeps.settings import BEST_CONFIG
    from sweeps.summary import write_parent_end

    best_yaml = (folder / BEST_CONFIG).read_text() if (folder / BEST_CONFIG).is_file() else None
    fig = None
    try:
        from sweeps.importance import importance_figure
        from sweeps.optuna_storage import load_study

        fig = importance_figure(load_study(settings.study_storage, settings.name))
    except Exception:
        fig = None
    write_parent_end(client, settings.parent_run_id, summary, best_yaml, fig)

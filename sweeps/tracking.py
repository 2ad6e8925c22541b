"""MLflow tracking of a sweep from the Ray Tune driver.

One parent run per sweep (created by :mod:`sweeps.run`; it holds the space, benchmark, cache key, git
commit and, at the end, the best config and value) and one child run per trial, tagged
``mlflow.parentRunId``. :class:`MlflowTracker` is a driver-side ``tune.Callback``: trials never talk to
MLflow. For every task step it logs the chosen metrics with ``step = task index`` (the means and the
per-dataset accuracies); at the end of a trial, its accuracy matrix as CSV and heatmap PNG, its
resolved config as YAML, its final checkpoint, and the outcome (completed, pruned, diverged, failed).

Logging is batched: metrics are queued and sent with ``log_batch`` (up to 1000 per call) when the
queue is large or a few seconds old, and at every trial end. If the tracking server is unreachable,
the queue is kept and retried; the sweep goes on (Ray's results stay the source of truth).

Ray's stock ``MLflowLoggerCallback`` opens unnested runs and, after ``Tuner.restore``, second runs for
resumed trials. Here the trial -> run mapping is part of the callback state (``get_state`` /
``set_state``, saved with the experiment), and runs are also found by their ``lada.trial_id`` tag, so
a resumed or retried trial continues its own child run and never logs a task step twice.
"""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from lada_core import metrics as M
from sweeps.objective import OBJECTIVE
from sweeps.trainable import DIVERGED, ERROR, NUM_TASKS, TASK_SECONDS, TASKS_DONE

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
DEFAULT_EXPERIMENT = "lada-sweeps"


def default_tracking_uri(folder: str | Path | None = None) -> str:
    """A sqlite store in the working folder (MLflow 3's default file name)."""
    return f"sqlite:///{(Path(folder or Path.cwd()) / 'mlflow.db').resolve()}"


def artifact_root_for(tracking_uri: str) -> str | None:
    """Where artifacts go for a local sqlite store: ``mlruns/`` beside the database (absolute), so
    that they do not land relative to whichever process created the experiment. None for a server."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlruns").resolve().as_uri()
    return None


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
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

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    # -- runs ------------------------------------------------------------------------------------
    def _existing_children(self) -> dict[str, str]:
        """Child runs of the parent by trial id (found once per driver process)."""
        if self._children is None:
            self._children = {}
            try:
                runs = self.client.search_runs(
                    [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'", max_results=5000
                )
                self.calls += 1
                for r in sorted(runs, key=lambda r: r.info.start_time or 0):
                    tid = r.data.tags.get(TRIAL_ID_TAG)
                    if tid:
                        self._children.setdefault(tid, r.info.run_id)
            except Exception as exc:
                logger.warning("MLflow: could not list the sweep's runs: %s", exc)
                self._children = None
                return {}
        return self._children

    def run_id_for(self, trial: Trial) -> str | None:
        """The trial's child run: the known one, a run tagged with its id, or a new one."""
        tid = trial.trial_id
        run_id = self.runs.get(tid) or self._existing_children().get(tid)
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
            logger.warning("MLflow: could not open the run of trial %s: %s", tid, exc)
            return self.runs.get(tid)
        self.runs[tid] = run_id
        return run_id

    # -- Tune hooks ----------------------------------------------------------------------------
    @_timed
    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if self._orphans_checked:
            return
        self._orphans_checked = True
        try:
            closed = close_orphans(self.client, self.experiment_id, self.parent_run_id, [t.trial_id for t in trials])
            self.calls += 1 + len(closed)
            if closed:
                logger.info("MLflow: closed %d runs of trials that a stopped driver never saved", len(closed))
        except Exception as exc:
            logger.warning("MLflow: could not check for orphaned runs: %s", exc)

    @_timed
    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.finished.discard(trial.trial_id)
        self.run_id_for(trial)

    def _backfill(self, trial: Trial, run_id: str) -> None:
        """Queue the steps Tune recorded (the trial's ``result.json``) that MLflow lacks: results a
        killed driver had received but not sent yet."""
        import json

        for base in (getattr(trial, "local_path", None), getattr(trial, "path", None)):
            if not base or "://" in str(base):
                continue
            f = Path(base) / "result.json"
            if not f.is_file():
                continue
            try:
                lines = f.read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                try:
                    res = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(res, dict) and M.TASK_INDEX in res:
                    self._queue(trial.trial_id, run_id, res)
            return

    @_timed
    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        tid = trial.trial_id
        run_id = self.runs.get(tid) or self.run_id_for(trial)
        if run_id is None or M.TASK_INDEX not in result:
            return
        self._queue(tid, run_id, result)
        if len(self._pending) >= self.flush_size:
            self.flush()

    def _queue(self, tid: str, run_id: str, result: Mapping[str, Any]) -> None:
        step = int(result[M.TASK_INDEX])
        accs = [k for k in result if k.startswith(ACC_PREFIX)]
        if accs:
            self.columns.setdefault(tid, [k[len(ACC_PREFIX):] for k in accs])
            self.rows.setdefault(tid, {})[step] = [float(result[k]) for k in accs]
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
        if self._pending and time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    @_timed
    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        result = trial.last_result or {}
        if result.get(DIVERGED):
            self.finish(trial, "FAILED", "diverged", str(result.get(ERROR, "training diverged")))
            return
        done, total = result.get(TASKS_DONE), result.get(NUM_TASKS)
        pruned = done is not None and total is not None and int(done) < int(total)
        self.finish(trial, "FINISHED", "pruned" if pruned else "completed")

    @_timed
    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        message = ""
        try:
            err = trial.get_error()
            message = str(err).strip().splitlines()[-1] if err else ""
        except Exception:
            pass
        self.finish(trial, "FAILED", "failed", message or "the trial raised an error")

    @_timed
    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self.flush()
        self.drain()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

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
                logger.warning("MLflow: could not log %d metrics of run %s (kept for a retry): %s", len(items), run_id, exc)
                with self._lock:
                    self._pending[:0] = [(run_id, m) for m in items]
        return ok

    def finish(self, trial: Trial, status: str, outcome: str, message: str = "") -> None:
        """End a trial's run: flush, matrix artifacts, config, checkpoint, outcome tags, status."""
        tid = trial.trial_id
        run_id = self.runs.get(tid) or self.run_id_for(trial)
        self.flush()
        if run_id is None:
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
        tags = {OUTCOME_TAG: outcome}
        result = trial.last_result or {}
        if TASKS_DONE in result:
            tags["lada.tasks_done"] = str(result[TASKS_DONE])
        if message:
            tags["lada.error"] = message[:4000]
        self.finished.add(tid)
        self._submit(self._finish_io, tid, run_id, status, tags, rows, names, config_yaml, checkpoint)

    def _finish_io(self, tid: str, run_id: str, status: str, tags: dict[str, str], rows: dict[int, list[float]],
                   names: list[str], config_yaml: str | None, checkpoint: Any) -> None:
        from mlflow.entities import RunTag

        tmp = Path(tempfile.mkdtemp(prefix="lada-mlflow-"))
        try:
            if rows and names:
                ordered = [rows[k] for k in sorted(rows)]
                lines = ["step," + ",".join(names)]
                for k in sorted(rows):
                    lines.append(f"{names[k] if k < len(names) else k}," + ",".join(f"{v:.4f}" for v in rows[k]))
                (tmp / MATRIX_CSV).write_text("\n".join(lines) + "\n")
                heatmap_figure(ordered, names).savefig(tmp / MATRIX_PNG, dpi=100)
            if config_yaml is not None:
                (tmp / "config.yaml").write_text(config_yaml)
            if any(tmp.iterdir()):
                self.client.log_artifacts(run_id, str(tmp))
                self.calls += 1
            if checkpoint is not None:
                ckpt_dir = tmp / "checkpoint"
                checkpoint.to_directory(str(ckpt_dir))
                self.client.log_artifacts(run_id, str(ckpt_dir), artifact_path="checkpoint")
                self.calls += 1
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            self.client.set_terminated(run_id, status=status)
            self.calls += 2
        except Exception as exc:
            logger.warning("MLflow: could not finish the run of trial %s: %s", tid, exc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _param_value(value: Any) -> str:
    text = "None" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))
    return text[:6000]


def close_orphans(client: MlflowClient, experiment_id: str, parent_run_id: str, keep: Iterable[str]) -> list[str]:
    """Mark KILLED the child runs still RUNNING whose trial is not in ``keep`` (trials a killed
    driver created after its last saved state: Tune will not resume them)."""
    keep = set(keep)
    out = []
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'", max_results=5000
    )
    for r in runs:
        if r.data.tags.get(TRIAL_ID_TAG) not in keep:
            client.set_terminated(r.info.run_id, status="KILLED")
            out.append(r.info.run_id)
    return out

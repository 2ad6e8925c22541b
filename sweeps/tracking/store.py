"""The MLflow store of a sweep: tags and limits, opening a client, creating the experiment (a new
sqlite store under a folder lock), the git commit, and the parent's child runs left RUNNING."""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lada_core import metrics as M
from sweeps.objective import OBJECTIVE, PEEK_SPLIT, VAL_METRICS, metric_key
from sweeps.results import TASK_SECONDS

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient

logger = logging.getLogger("sweeps.tracking")

PARENT_TAG = "mlflow.parentRunId"
TRIAL_ID_TAG = "lada.trial_id"
SWEEP_TAG = "lada.sweep"
OUTCOME_TAG = "lada.outcome"
ACC_PREFIX = metric_key("acc/")
STEP_METRICS = (*VAL_METRICS, metric_key(M.SEEN_MEAN), OBJECTIVE, TASK_SECONDS)
"""Per-step metric keys logged besides ``val/acc/<dataset>`` (names shared with the trainer)."""
PEEK_PREFIX = metric_key("", PEEK_SPLIT)
"""``test/``: the metrics ``--peek-test`` adds (logged, never selected on)."""
MATRIX_CSV = "accuracy_matrix.csv"
MATRIX_PNG = "accuracy_matrix.png"
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3's UI opens an experiment with this kind on its runs table (else on its GenAI traces view)."""


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
    """The experiment ``name`` (created, or restored if deleted), tagged :data:`EXPERIMENT_KIND_TAG`
    so that the MLflow 3 UI opens it on its runs table (an experiment made before is tagged now)."""
    with sqlite_store_lock(tracking_uri):  # two sweeps creating the experiment at once: one creates it
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        return client.create_experiment(name, artifact_location=artifact_root_for(tracking_uri),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


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

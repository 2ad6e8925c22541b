"""MLflow tracking of a sweep from the Ray Tune driver.

One parent run per sweep (created by :mod:`sweeps.runner`; it holds the space, benchmark, cache key, git
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

Inside: ``store`` (tags, client, experiment, orphaned runs), ``writer`` (one queue, one thread),
``callback`` (:class:`MlflowTracker`, Tune events only), ``artifacts`` (what closes a trial's run),
``sync`` (:func:`sync_sweep`).
"""

from sweeps.tracking.artifacts import heatmap_figure, matrix_csv, outcome_tags, step_metrics, write_trial_end
from sweeps.tracking.callback import MlflowTracker
from sweeps.tracking.store import (
    ACC_PREFIX,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    MATRIX_CSV,
    MATRIX_PNG,
    MAX_BATCH,
    OUTCOME_TAG,
    PARENT_TAG,
    STEP_METRICS,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    artifact_root_for,
    close_orphans,
    get_or_create_experiment,
    git_commit,
    open_client,
    running_children,
    sqlite_store_lock,
    sqlite_store_path,
)
from sweeps.tracking.sync import sync_sweep
from sweeps.tracking.writer import MlflowWriter

__all__ = [
    "ACC_PREFIX", "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "MATRIX_CSV", "MATRIX_PNG", "MAX_BATCH", "OUTCOME_TAG", "PARENT_TAG", "STEP_METRICS", "SWEEP_TAG", "TRIAL_ID_TAG",
    "MlflowTracker", "MlflowWriter", "artifact_root_for", "close_orphans", "get_or_create_experiment", "git_commit", "heatmap_figure",
    "matrix_csv", "open_client", "outcome_tags", "running_children", "sqlite_store_lock", "sqlite_store_path", "step_metrics",
    "sync_sweep", "write_trial_end",
]

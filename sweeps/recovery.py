"""The one owner of resume and restore gaps: what a restarted driver, a retried trial and a lost worker
find, and how each step of a trial reaches every reader exactly once.

INVARIANT. Every task step of every trial reaches each reader of a sweep - the MLflow child run, the
Optuna study, ``lada-sweep-report`` and :func:`sweeps.results.read_results` - exactly once, and no
finished task is trained twice, whatever was lost: a worker (its process or its node) between a result
and its checkpoint, or the driver between two of Tune's experiment snapshots.

How each gap is closed (the parts that need a store live with it, named here):

- A trial restored from an older checkpoint than it had stored (a driver killed between snapshots)
  starts from its newest complete stored checkpoint (:func:`newest_stored_checkpoint`,
  :func:`resume_point`), and reports the steps Tune's state lacks again without training them,
  marked ``replayed=1`` (:mod:`sweeps.trainable`).
- Exactly once is the readers' rule, not Ray's: a replayed step may already be in Ray's
  ``result.json`` (Tune took the result, then lost the worker before it fetched that result's
  checkpoint; or the driver restarted after it), so ``result.json`` is at-least-once.
  :func:`sweeps.results.read_results` keeps each step's first report, the MLflow callback skips steps
  its run has (``task_index`` history), the Optuna study ignores a repeated step. This holds the same
  on a local folder, a shared one and a cloud URI.
- A restored searcher reconciles its study with the trials Tune restores (:func:`expect_tune_trials`
  before ``Tuner.restore``; :meth:`sweeps.search.LadaSearcher.fail_orphans`): a trial asked by a
  killed driver and owned by no Tune trial is failed, an enqueued point among them enqueued again;
  the searcher's trial budget and its live trials (it holds the concurrency limit, not Tune's
  ``ConcurrencyLimiter``) are those Tune restores, so an older searcher state cannot stall the search.
- MLflow: runs of trials a killed driver never saved are closed KILLED
  (:func:`sweeps.tracking.close_orphans`); runs of trials that ended before the kill are closed with
  their outcome (:class:`sweeps.tracking.MlflowTracker`); the final checkpoint logged is the newest
  stored one (:func:`newest_into`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from sweeps import ray_compat

_expected: dict[str, str] | None = None  # set by the driver before Tuner.restore (expect_tune_trials)


def expect_tune_trials(trials: Mapping[str, str] | None) -> None:
    """The trials (id -> Tune status) of the experiment state a ``Tuner.restore`` is about to load
    (None: unknown). The restored searcher (unpickled by Tune, in this process) reconciles the study,
    its trial budget and its count of live trials with them."""
    global _expected
    _expected = None if trials is None else dict(trials)


def expected_tune_trials() -> dict[str, str] | None:
    return None if _expected is None else dict(_expected)


def saved_tune_trials(folder: str | Path) -> dict[str, str] | None:
    """The trials (id -> Tune status) of the experiment state ``Tuner.restore`` loads from a local
    sweep folder (None: unknown). Reads Tune's file format: :func:`sweeps.ray_compat.saved_tune_trials`."""
    return ray_compat.saved_tune_trials(folder)


def _task_index(folder: Path) -> int:
    """Index of the newest ``task-NNN`` checkpoint folder under ``folder`` (-1 if none)."""
    best = -1
    for p in folder.glob("task-*/state.pt"):
        try:
            best = max(best, int(p.parent.name.split("-")[1]))
        except (IndexError, ValueError):
            continue
    return best


def _loadable(task_dir: Path) -> bool:
    """A complete checkpoint folder: its ``row.json`` parses and its ``state.pt`` loads (an upload
    cut short by a full disk leaves a truncated copy behind)."""
    try:
        json.loads((task_dir / "row.json").read_text())
        from lada_core.trainer import load_checkpoint

        load_checkpoint(task_dir)
        return True
    except Exception:
        return False


def newest_stored_checkpoint(results_dir: str | None, trial_id: str, newer_than: int = -1) -> Path | None:
    """The newest complete ``task-NNN`` folder this trial persisted under the sweep's folder (local or
    shared storage), of a task after ``newer_than`` (only those are opened). A driver killed between
    two experiment snapshots restores a trial from an older checkpoint than the trial had written;
    the newer one on disk saves redoing tasks."""
    if not results_dir:
        return None
    found: list[tuple[int, Path]] = []
    from sweeps import ray_compat

    for trial_dir in ray_compat.trial_dirs(results_dir, trial_id):
        for p in trial_dir.glob("checkpoint_*/task-*/state.pt"):
            try:
                k = int(p.parent.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if k > newer_than:
                found.append((k, p.parent))
    for _, task_dir in sorted(found, key=lambda kp: kp[0], reverse=True):
        if _loadable(task_dir):
            return task_dir
    return None


def resume_point(workdir: Path, results_dir: str | None, trial_id: str) -> int:
    """Put the trial's newest complete stored checkpoint in ``workdir`` when it is newer than the one
    Tune restored there; returns the last step of Tune's checkpoint. Steps after it are reported
    (those the newer stored checkpoint holds again without training, marked ``replayed=1``: the
    driver may already hold them, and every reader keeps a step's first report)."""
    tune_known = _task_index(workdir)
    stored = newest_stored_checkpoint(results_dir, trial_id, newer_than=tune_known)
    if stored is not None:
        for old in workdir.glob("task-*"):
            shutil.rmtree(old)
        shutil.copytree(stored, workdir / stored.name)
    return tune_known


def newest_into(ckpt_dir: Path, results_dir: str | None, trial_id: str) -> None:
    """Put the trial's newest stored task checkpoint in ``ckpt_dir`` when it is newer than the one
    Tune holds (Tune took the last result but lost the worker before it fetched that result's
    checkpoint)."""
    newest = newest_stored_checkpoint(results_dir, trial_id, newer_than=_task_index(ckpt_dir))
    if newest is not None:
        shutil.rmtree(ckpt_dir)
        shutil.copytree(newest, ckpt_dir / newest.name)

"""Optuna under Ray Tune: a persisted study, the paper defaults first, early-stopped trials as PRUNED.

Ray's ``OptunaSearch`` tells Optuna every trial that ends with a result as COMPLETE, including a trial
that ASHA stopped after a few tasks: its partial value then misleads TPE. :class:`LadaOptunaSearch`
tells such a trial PRUNED (its per-task values stay as intermediate values, which TPE reads for
pruned trials), a diverged or errored trial FAIL, and only a trial that reached its last task
COMPLETE. The study lives in an Optuna storage next to the sweep's results, so ``--resume``
continues it and another process (``sweeps/report.py``) can read it while the sweep runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from lada_core import metrics as M
from sweeps import ray_compat
from sweeps.objective import OBJECTIVE
from sweeps.optuna_storage import RAY_TRIAL_ID_ATTR, storage_path
from sweeps.results import ERROR, classify, optuna_state

logger = logging.getLogger(__name__)

_saved_tune_trials: set[str] | None = None  # set by the driver before Tuner.restore (expect_tune_trials)


def expect_tune_trials(trial_ids: Iterable[str] | None) -> None:
    """The trial ids of the experiment state a ``Tuner.restore`` is about to load (None: unknown). The
    restored searcher (unpickled by Tune, in this process) reconciles the study with them."""
    global _saved_tune_trials
    _saved_tune_trials = None if trial_ids is None else set(trial_ids)


def saved_tune_trials(folder: str | Path) -> set[str] | None:
    """The trial ids of the experiment state ``Tuner.restore`` loads from a local sweep folder
    (None: unknown). Reads Tune's file format: :func:`sweeps.ray_compat.saved_tune_trials`."""
    return ray_compat.saved_tune_trials(folder)


class LadaOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that tells early-stopped trials PRUNED and enqueues points idempotently.

    It reads ``OptunaSearch``'s private state through :mod:`sweeps.ray_compat` (``optuna_search_state``,
    required: outside its tested Ray and Optuna versions the searcher refuses to start)."""

    def __init__(
        self,
        space: Callable[[Any], dict[str, Any] | None],
        metric: str = OBJECTIVE,
        mode: str = "max",
        points_to_evaluate: Sequence[Mapping[str, Any]] = (),
        sampler: optuna.samplers.BaseSampler | None = None,
        study_name: str | None = None,
        storage: optuna.storages.BaseStorage | None = None,
    ) -> None:
        ray_compat.require("optuna_search_state")
        super().__init__(space=space, metric=metric, mode=mode, sampler=sampler, study_name=study_name, storage=storage)
        # OptunaSearch's own points_to_evaluate would enqueue them again on every construction;
        # skip_if_exists keeps a rerun on the same study from evaluating the defaults twice.
        for point in points_to_evaluate:
            ray_compat.search_study(self).enqueue_trial(dict(point), skip_if_exists=True)

    @property
    def study(self) -> optuna.Study:
        return ray_compat.search_study(self)

    def suggest(self, trial_id: str) -> dict | None:
        try:
            params = super().suggest(trial_id)
            ot_trial = ray_compat.search_trials(self).get(trial_id)
            if ot_trial is not None:
                ot_trial.set_user_attr(RAY_TRIAL_ID_ATTR, trial_id)
        except Exception as exc:
            # The study's storage (next to the results) on a full or read-only disk. Returning None
            # would leave Tune waiting for a suggestion (it blocks when no trial runs): end the run
            # instead; lada-sweep reports it in one line, trials stay resumable.
            from sweeps.storage import StorageError, describe, report_failure

            where = storage_path(ray_compat.study_storage(self.study))
            found = describe(exc, where)
            if found is None:
                raise
            report_failure(exc, where)
            raise StorageError(f"{found} (the Optuna study)") from exc
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        ot_trial = ray_compat.search_trials(self).get(trial_id)
        if ot_trial is None or trial_id in ray_compat.search_completed(self):
            return
        value = result.get(self.metric)
        step = result.get(M.TASK_INDEX, result.get("training_iteration"))
        if value is None or step is None or not math.isfinite(float(value)):
            return
        try:
            ot_trial.report(float(value), int(step))
        except Exception as exc:  # a finished trial (after a restore) or a repeated step
            logger.debug("optuna report skipped: %s", exc)

    @staticmethod
    def outcome(result: Mapping[str, Any] | None, metric: str, error: bool) -> tuple[TrialState, float | None]:
        """How a finished Tune trial is told to Optuna (:func:`sweeps.results.classify`)."""
        state = TrialState[optuna_state(classify(result, error, metric))]
        return state, float(result[metric]) if state == TrialState.COMPLETE and result else None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in ray_compat.search_completed(self):
            return
        ot_trial = ray_compat.search_trials(self).get(trial_id)
        if ot_trial is None:
            return
        ray_compat.search_completed(self).add(trial_id)
        frozen = ray_compat.frozen_trial(self.study, ot_trial)
        if frozen.state.is_finished():
            return  # told before a driver restart whose state predates it
        state, value = self.outcome(result, self.metric, error)
        if result and result.get(ERROR):
            ot_trial.set_user_attr("error", str(result[ERROR])[:500])
        try:
            self.study.tell(ot_trial, value if state == TrialState.COMPLETE else None, state=state)
        except Exception as exc:
            logger.warning("could not tell Optuna the end of trial %s: %s", trial_id, exc)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.fail_orphans(_saved_tune_trials)

    def fail_orphans(self, tune_trials: Iterable[str] | None = None) -> list[int]:
        """Mark FAIL the study's RUNNING trials that no Tune trial owns (asked by a driver that was
        killed before it saved its state): they would otherwise stay RUNNING forever.

        ``tune_trials``, the trial ids of the experiment state Tune restores, reconciles the two
        saved states first (a driver killed while uploading a snapshot can leave an experiment state
        newer than the searcher's, or the other way round): a RUNNING trial of the study that Tune
        restores is adopted by its ``ray_trial_id`` (it runs again and is told its end), and one the
        searcher holds but Tune does not know is dropped, then failed here."""
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if tune_trials is not None:
            tune_trials = set(tune_trials)
            for t in running:
                rid = t.user_attrs.get(RAY_TRIAL_ID_ATTR)
                if rid in tune_trials and rid not in ray_compat.search_trials(self):
                    ray_compat.search_trials(self)[rid] = ray_compat.optuna_trial(self.study, t)
                    logger.info("Optuna trial %d adopted by its Tune trial %s", t.number, rid)
            numbers = {t.number for t in running}
            for rid, ot_trial in list(ray_compat.search_trials(self).items()):
                if rid not in tune_trials and ot_trial.number in numbers:
                    del ray_compat.search_trials(self)[rid]
        owned = {t.number for t in ray_compat.search_trials(self).values()}
        failed = []
        for t in running:
            if t.number not in owned:
                try:
                    self.study.tell(t.number, state=TrialState.FAIL)
                    failed.append(t.number)
                    fixed = t.system_attrs.get("fixed_params")
                    if fixed:  # an enqueued point (the paper defaults, a grid point) that never ran
                        self.study.enqueue_trial(dict(fixed), skip_if_exists=False)
                except Exception as exc:  # pragma: no cover - raced with another writer
                    logger.warning("could not close orphaned Optuna trial %d: %s", t.number, exc)
        return failed

"""Optuna under Ray Tune: a Tune ``Searcher`` over Optuna's public ask-and-tell interface.

:class:`LadaSearcher` asks the study for a trial per Tune trial (``Study.ask``; the space is a
define-by-run function), reports each task's objective (``Trial.report``, so TPE sees the per-task
values of pruned trials) and tells each trial's end by the one outcome rule
(:func:`sweeps.results.classify`): a trial ASHA stopped early is PRUNED (Ray's ``OptunaSearch`` told
it COMPLETE with its partial value, which misleads TPE), a diverged or errored one FAIL, only a trial
that reached its last task COMPLETE. Points to evaluate are enqueued once (``enqueue_trial``
``skip_if_exists``). The study lives in an Optuna storage next to the sweep's results, so
``--resume`` continues it with its history, and another process (``sweeps/report.py``) can read it
while the sweep runs.

The searcher also keeps the trial budget (``num_samples``) and the limit on concurrent trials
(``Searcher.set_max_concurrency``, so Tune's ``ConcurrencyLimiter`` passes suggestions through). Tune
saves its experiment state and the searcher's state (with its wrappers') as separate files, and a
full disk or a killed driver can leave one older than the other; a ``ConcurrencyLimiter`` restored
with a trial live that Tune restores as finished never suggests again and the sweep waits forever.
Here both counts are set from the trials Tune restores (:meth:`LadaSearcher.restore`).
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from lada_core import metrics as M
from sweeps import faults, ray_compat
from sweeps.objective import OBJECTIVE
from sweeps.optuna_storage import RAY_TRIAL_ID_ATTR, open_storage, storage_file
from sweeps.results import ERROR, classify, optuna_state

logger = logging.getLogger(__name__)

class LadaSearcher(Searcher):
    """A Tune searcher over an Optuna study (see the module docstring).

    ``storage``: an Optuna storage URL (or journal file path), or a storage object; the study
    ``study_name`` in it is continued when it exists."""

    def __init__(
        self,
        space: Callable[[Any], dict[str, Any] | None],
        metric: str = OBJECTIVE,
        mode: str = "max",
        points_to_evaluate: Sequence[Mapping[str, Any]] = (),
        sampler: optuna.samplers.BaseSampler | None = None,
        study_name: str | None = None,
        storage: str | optuna.storages.BaseStorage | None = None,
        num_samples: int | None = None,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.space = space
        self.storage_file = storage_file(storage) if isinstance(storage, str) else None
        opened = open_storage(storage) if isinstance(storage, str) else storage
        self.study = optuna.create_study(study_name=study_name, storage=opened, sampler=sampler, load_if_exists=True,
                                         direction="maximize" if mode == "max" else "minimize")
        for point in points_to_evaluate:  # a rerun on the same study does not evaluate them twice
            self.study.enqueue_trial(dict(point), skip_if_exists=True)
        self._trials: dict[str, optuna.trial.Trial | int] = {}  # Tune trial id -> its Optuna trial (or number)
        self._ended: set[str] = set()
        self.num_samples = num_samples  # None: Tune's own count ends the search
        self.max_concurrent = 0  # 0: no limit (set by Tune through set_max_concurrency)
        self._given: set[str] = set()  # Tune trials this sweep's budget has given a configuration
        self._live: set[str] = set()  # those Tune has not ended

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled by ``Tuner.restore``: a searcher pickled before the budget was kept here gets it."""
        given = set(state.get("_trials", ()))
        defaults = {"num_samples": None, "max_concurrent": 0, "_given": given, "_live": given - set(state.get("_ended", ()))}
        self.__dict__.update({**defaults, **state})

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self.max_concurrent = max_concurrent
        return True

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._given:
            if self.num_samples is not None and len(self._given) >= self.num_samples:
                return Searcher.FINISHED  # type: ignore[return-value]  # Tune's end-of-search sentinel (a str)
            if self.max_concurrent and len(self._live) >= self.max_concurrent:
                return None  # Tune asks again when a trial ends
        try:
            trial = self._trials.get(trial_id)
            if not isinstance(trial, optuna.trial.Trial):
                faults.at("search.ask")
                trial = self.study.ask()
                self._trials[trial_id] = trial
                trial.set_user_attr(RAY_TRIAL_ID_ATTR, trial_id)
            returned = self.space(trial)
        except Exception as exc:
            # The study's storage (next to the results) on a full or read-only disk. Returning None
            # would leave Tune waiting for a suggestion (it blocks when no trial runs): end the run
            # instead; lada-sweep reports it in one line, trials stay resumable.
            from sweeps.storage import StorageError, describe, report_failure

            found = describe(exc, self.storage_file)
            if found is None:
                raise
            report_failure(exc, self.storage_file)
            raise StorageError(f"{found} (the Optuna study)") from exc
        self._given.add(trial_id)
        self._live.add(trial_id)
        return {**trial.params, **(returned or {})}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        trial = self._trials.get(trial_id)
        if not isinstance(trial, optuna.trial.Trial) or trial_id in self._ended:
            return
        value = result.get(self.metric)
        step = result.get(M.TASK_INDEX, result.get("training_iteration"))
        if value is None or step is None or not math.isfinite(float(value)):
            return
        try:
            trial.report(float(value), int(step))
        except Exception as exc:  # a finished trial (after a restore) or a repeated step
            logger.debug("optuna report skipped: %s", exc)

    @staticmethod
    def outcome(result: Mapping[str, Any] | None, metric: str, error: bool) -> tuple[TrialState, float | None]:
        """How a finished Tune trial is told to Optuna (:func:`sweeps.results.classify`)."""
        state = TrialState[optuna_state(classify(result, error, metric))]
        return state, float(result[metric]) if state == TrialState.COMPLETE and result else None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._live.discard(trial_id)
        trial = self._trials.get(trial_id)
        if trial is None or trial_id in self._ended:
            return
        self._ended.add(trial_id)
        state, value = self.outcome(result, self.metric, error)
        if result and result.get(ERROR) and isinstance(trial, optuna.trial.Trial):
            trial.set_user_attr("error", str(result[ERROR])[:500])
        try:
            # skip_if_finished: told before a driver restart whose saved state predates it
            self.study.tell(trial, value, state=state, skip_if_finished=True)
        except Exception as exc:
            logger.warning("could not tell Optuna the end of trial %s: %s", trial_id, exc)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"trials": self._trials, "ended": self._ended, "given": self._given, "live": self._live}, f)

    def restore(self, checkpoint_path: str) -> None:
        """Load the saved state, then take the trials Tune restores as the truth: the study's trials
        are reconciled with them (:meth:`fail_orphans`), the budget counts them, and the live ones
        are those Tune runs again (all but TERMINATED; errored ones are resumed too)."""
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self._trials, self._ended = dict(state["trials"]), set(state["ended"])
        self._given = set(state.get("given", self._trials))
        self._live = set(state.get("live", set(self._trials) - self._ended))
        from sweeps.recovery import expected_tune_trials

        tune_trials = expected_tune_trials()
        self.fail_orphans(tune_trials)
        if tune_trials is not None:
            self._given = set(tune_trials)
            self._live = {tid for tid, status in tune_trials.items() if status != "TERMINATED"}

    def _number(self, trial: optuna.trial.Trial | int) -> int:
        return trial if isinstance(trial, int) else trial.number

    def fail_orphans(self, tune_trials: Iterable[str] | None = None) -> list[int]:
        """Mark FAIL the study's RUNNING trials that no Tune trial owns (asked by a driver that was
        killed before it saved its state): they would otherwise stay RUNNING forever. An enqueued
        point among them (the paper defaults) is enqueued again.

        ``tune_trials``, the trial ids of the experiment state Tune restores, reconciles the two
        saved states first (a driver killed while uploading a snapshot can leave an experiment state
        newer than the searcher's, or the other way round): a RUNNING trial of the study that Tune
        restores is adopted by its ``ray_trial_id`` (it runs again and is told its end), and one the
        searcher holds but Tune does not know is dropped, then failed here."""
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if tune_trials is not None:
            self._reconcile(running, set(tune_trials))
        owned = {self._number(t) for t in self._trials.values()}
        failed = []
        for t in running:
            if t.number in owned:
                continue
            try:
                self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                failed.append(t.number)
                fixed = ray_compat.enqueued_params(t)
                if fixed:  # an enqueued point (the paper defaults, a grid point) that never ran
                    self.study.enqueue_trial(dict(fixed), skip_if_exists=False)
            except Exception as exc:  # pragma: no cover - raced with another writer
                logger.warning("could not close orphaned Optuna trial %d: %s", t.number, exc)
        return failed

    def _reconcile(self, running: list[Any], tune_trials: set[str]) -> None:
        for t in running:
            rid = t.user_attrs.get(RAY_TRIAL_ID_ATTR)
            if rid in tune_trials and rid not in self._trials:
                self._trials[rid] = ray_compat.optuna_trial(self.study, t)
                logger.info("Optuna trial %d adopted by its Tune trial %s", t.number, rid)
        numbers = {t.number for t in running}
        for rid, trial in list(self._trials.items()):
            if rid not in tune_trials and self._number(trial) in numbers:
                del self._trials[rid]

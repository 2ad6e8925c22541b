"""Optuna's parameter importances of a sweep's study, and their bar chart.

Optuna 5's default evaluator (PED-ANOVA) ranks parameters by how much they matter for reaching the
LOWEST target values whenever a ``target`` is given. Accuracy is maximized, so no target is passed
(:func:`importances`): the evaluator then follows the study's direction. fANOVA is the fallback when
PED-ANOVA cannot run (too few trials).
"""

from __future__ import annotations

from typing import Any


def importances(study: Any, evaluator: str = "ped-anova") -> dict[str, float]:
    """Parameter importances of the study's COMPLETE trials for reaching GOOD objective values."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        raise ValueError(f"importances need at least 2 completed trials, have {len(complete)}")
    # No ``target``: the evaluator then reads the study's direction (top trials = HIGHEST accuracy).
    # With a target, PED-ANOVA would treat LOWER as better: a maximized accuracy passed as
    # ``target=lambda t: t.value`` silently ranks parameters for bad trials (the trap).
    ev = PedAnovaImportanceEvaluator() if evaluator == "ped-anova" else FanovaImportanceEvaluator(seed=0)
    try:
        return dict(optuna.importance.get_param_importances(study, evaluator=ev))
    except Exception:
        if evaluator != "ped-anova":
            raise
        return dict(optuna.importance.get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0)))


def evaluator_for(study: Any) -> Any:
    """The importance evaluator :func:`importances` uses for ``study``: PED-ANOVA (no target, so it
    follows the study's direction) when it can rank the study's trials, else fANOVA."""
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    try:
        import optuna

        optuna.importance.get_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
        return PedAnovaImportanceEvaluator()
    except Exception:
        return FanovaImportanceEvaluator(seed=0)

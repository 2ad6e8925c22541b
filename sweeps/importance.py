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


def importance_figure(study: Any) -> Any:
    """A bar chart of :func:`importances` (None when there are too few trials or no parameters)."""
    try:
        imp = importances(study)
    except Exception:
        return None
    if not imp:
        return None
    from matplotlib.figure import Figure

    names = list(imp)[::-1]
    fig = Figure(figsize=(6, 1 + 0.4 * len(names)), layout="constrained")
    ax = fig.subplots()
    ax.barh(names, [imp[n] for n in names])
    ax.set_xlabel("importance for a high objective (PED-ANOVA)")
    ax.set_title(study.study_name)
    return fig

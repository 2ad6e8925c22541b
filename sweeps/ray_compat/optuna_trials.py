"""The touches of Optuna internals (see :mod:`sweeps.ray_compat`); each one asks the gate first."""

from __future__ import annotations

from typing import Any

from sweeps.ray_compat.gate import active


def optuna_trial(study: Any, frozen: Any) -> Any:
    """A live ``optuna.trial.Trial`` for a RUNNING trial of ``study`` (adopting it, so that its
    per-task values can be reported); its number when refused (its end can still be told)."""
    if not active("optuna_trials"):
        return frozen.number
    import optuna

    return optuna.trial.Trial(study, frozen._trial_id)


def enqueued_params(frozen: Any) -> dict[str, Any] | None:
    """The parameters a trial was enqueued with (``Study.enqueue_trial``), None when it was not, or
    when refused."""
    if not active("optuna_trials"):
        return None
    fixed = frozen.system_attrs.get("fixed_params")
    return dict(fixed) if fixed else None

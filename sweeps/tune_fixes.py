"""A guard around one behaviour of Ray Tune's driver (Ray 2.60) that loses trials when a node dies.

When a trial's actor becomes unreachable (its node lost), Tune can receive the failure of more than
one of that actor's tasks (a reused actor, for instance, has a ``reset`` and a ``train`` call in
flight). The first failure requeues the trial for a retry (PENDING, its actor taken away); the
second one then meets a PENDING trial and, in ``TuneController._process_trial_failure``, ends it as
ERROR, whatever ``FailureConfig(max_failures)`` allows. The sweep loses a trial that it had just
decided to retry on the node that is left.

:func:`ignore_stale_task_failures` wraps ``TuneController._trial_task_failure``: a task failure for a
trial that is PENDING and holds no actor is the failure of an actor the trial was already taken off
(a PENDING trial without an actor has no task in flight), so it is logged and dropped. Every other
failure goes to Tune as before.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)


class _IgnoreStale:
    def __init__(self, original: Any) -> None:
        self.original = original

    def __get__(self, controller: Any, owner: Any = None) -> Any:
        if controller is None:
            return self
        return functools.partial(self, controller)

    def __call__(self, controller: Any, trial: Any, exception: Exception) -> Any:
        if is_stale(controller, trial):
            logger.info("trial %s: ignoring a failure of an actor it no longer has (%s); its retry goes on",
                        trial, str(exception).strip().splitlines()[0][:200] if str(exception).strip() else type(exception).__name__)
            return None
        return self.original(controller, trial, exception)


def is_stale(controller: Any, trial: Any) -> bool:
    """A failure that reaches a trial waiting for its retry, with no actor of its own."""
    return getattr(trial, "status", None) == "PENDING" and trial not in getattr(controller, "_trial_to_actor", {})


def ignore_stale_task_failures() -> bool:
    """Install the guard (once per process). False when Tune's controller lacks the method (another
    Ray version): nothing is changed then."""
    try:
        from ray.tune.execution.tune_controller import TuneController
    except ImportError:
        return False
    current = TuneController.__dict__.get("_trial_task_failure")
    if current is None:
        return False
    if not isinstance(current, _IgnoreStale):
        TuneController._trial_task_failure = _IgnoreStale(current)  # type: ignore[method-assign]
    return True

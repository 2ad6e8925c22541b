"""The gate of :mod:`sweeps.ray_compat`: each touch checked once per process, one warning when refused,
the table of guarantees for the sweep's summary."""

from __future__ import annotations

import logging
import threading

from sweeps.ray_compat.checks import _CHECKS, GUARANTEES, _ray_version_problem

logger = logging.getLogger("sweeps.ray_compat")

_lock = threading.Lock()
_status: dict[str, str | None] = {}  # touch -> None (active) or the reason it is inactive
_warned: set[str] = set()


def problem(touch: str) -> str | None:
    """Why ``touch`` may not be used here (None: it may). Checked once per process."""
    with _lock:
        if touch in _status:
            return _status[touch]
    found = _ray_version_problem()
    if found is None:
        try:
            found = _CHECKS[touch]()
        except Exception as exc:  # an import that moved, a source that cannot be read
            found = f"{type(exc).__name__}: {exc}"
    with _lock:
        _status[touch] = found
    return found


def active(touch: str) -> bool:
    """True when ``touch`` may be used; otherwise logs one warning per touch and process."""
    found = problem(touch)
    if found is None:
        return True
    with _lock:
        first = touch not in _warned
        _warned.add(touch)
    if first:
        logger.warning("lada-sweep: %s is inactive (%s): %s", touch, found, GUARANTEES[touch])
    return False


def guarantees() -> dict[str, str]:
    """Every touch: ``"active"`` or ``"inactive: <reason>"`` (for the sweep's summary)."""
    return {name: "active" if problem(name) is None else f"inactive: {problem(name)}" for name in _CHECKS}


def _reset_for_tests() -> None:
    with _lock:
        _status.clear()
        _warned.clear()

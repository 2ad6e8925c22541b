"""Fault seams: named points in the sweep where a fault plan, read from the environment, makes a real
failure happen, so that the fault tests drive the product's own code paths (no patching of modules
from the outside) and can check that each fault fired.

Inactive unless ``LADA_FAULT_PLAN`` is set (then a JSON object, point -> what to do there); every
fault that fires appends one JSON line to the file ``LADA_FAULT_LOG`` names, when it is set. The
plan reaches Ray's workers with the driver's environment (a local Ray), or through the job's
``runtime_env``.

Points and what they accept:

- ``search.ask`` (the driver, before the searcher asks the Optuna study for a trial):
  ``{"nth": N, "until": FILE}`` holds the N-th ask of this process until FILE exists (at most
  ``timeout`` seconds, default 300), or ``{"nth": N, "sleep": S}`` for S seconds (a test makes the
  study database the first write to meet a full disk).
- ``trial.after_task`` (a trial's worker, right after it reported a task it trained, with that task's
  checkpoint): ``{"task": K, ...}`` acts after task K only (any task without ``task``);
  ``{"exit": CODE}`` ends the worker process at once (as a lost node would); ``{"until": FILE}`` holds
  the worker there until FILE exists (a test then kills it, its node, or a server, at a known point);
  ``"once": MARKER`` acts the first time only (MARKER is created exclusively and holds the worker's pid).
- ``cache.encode`` (a Ray encoder actor of ``lada-cache --ray``, before it encodes a shard job):
  ``{"exit": CODE, "once": MARKER}`` ends the actor's process (a lost node), so the driver must hand
  its jobs to another encoder; ``task`` and ``shard`` narrow it to one job.

Every firing's log line holds the point, the pid, the time, the plan's entry and where it fired
(``task`` for ``trial.after_task``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

PLAN_ENV = "LADA_FAULT_PLAN"
LOG_ENV = "LADA_FAULT_LOG"

_counts: dict[str, int] = {}


def plan() -> dict[str, dict[str, Any]]:
    """The fault plan of this process's environment (empty when none is set)."""
    text = os.environ.get(PLAN_ENV)
    if not text:
        return {}
    try:
        found = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{PLAN_ENV} is not a JSON object: {exc}") from None
    return found if isinstance(found, dict) else {}


def at(point: str, **where: Any) -> None:
    """Run the fault the plan holds for ``point`` (nothing when it holds none). ``where`` says where
    the point was reached (``task=3``): a plan entry that names one of its keys with another value
    does not act there, nor count it."""
    spec = plan().get(point)
    if not spec or any(k in spec and spec[k] != v for k, v in where.items()):
        return
    _counts[point] = _counts.get(point, 0) + 1
    if "nth" in spec and _counts[point] != int(spec["nth"]):
        return
    if "once" in spec:
        try:
            fd = os.open(spec["once"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
    _log(point, {**spec, **where})
    if "until" in spec:
        deadline = time.monotonic() + float(spec.get("timeout", 300))
        while not os.path.exists(spec["until"]) and time.monotonic() < deadline:
            time.sleep(0.05)
    if "sleep" in spec:
        time.sleep(float(spec["sleep"]))
    if "exit" in spec:
        os._exit(int(spec["exit"]))


def _log(point: str, spec: dict[str, Any]) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"point": point, "pid": os.getpid(), "time": time.time(), **spec}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def fired(log: str | os.PathLike[str], point: str) -> list[dict[str, Any]]:
    """The firings of ``point`` a fault log holds (for tests)."""
    try:
        lines = open(log).read().splitlines()
    except OSError:
        return []
    return [e for e in map(json.loads, filter(None, lines)) if e.get("point") == point]

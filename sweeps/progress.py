"""The sweep's progress on the console: a Tune callback in the driver.

One progress line (trials done / running / pruned / failed, the best objective so far with its
parameters, elapsed time and ETA) and one line per finished trial. On a terminal the progress line
is rewritten in place; otherwise (a file, a pipe, CI) it is printed as a plain line at most every
``plain_every_s`` seconds, and once at the end. Counts are recomputed from Tune's trials at every
step, so a restored sweep shows the trials that ended before the restart too.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from ray.tune import Callback

from sweeps.objective import OBJECTIVE
from sweeps.results import COMPLETED, DIVERGED_OUTCOME, FAILED, NOT_RUN, PRUNED, TASKS_DONE, classify


def fmt_params(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(config.items()))


def fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def progress_text(counts: dict[str, int], total: int, best: tuple[float, dict[str, Any]] | None, objective: str,
                  elapsed: float, fraction: float) -> str:
    """The progress line: counts, best so far, elapsed and ETA (from the share of task steps done)."""
    done = counts.get(COMPLETED, 0)
    ended = sum(counts.values()) - counts.get("running", 0)
    parts = [f"trials {ended}/{total} done ({done} completed, {counts.get('running', 0)} running, "
             f"{counts.get(PRUNED, 0)} pruned, {counts.get(FAILED, 0)} failed)"]
    if best is not None:
        parts.append(f"best {objective} {best[0]:.3f} ({fmt_params(best[1]) or 'paper defaults'})")
    eta = elapsed * (1 - fraction) / fraction if 0 < fraction < 1 and elapsed >= 1 else (0.0 if fraction >= 1 else math.nan)
    parts.append(f"{100 * fraction:.0f}% of task steps, elapsed {fmt_duration(elapsed)}, ETA {'?' if math.isnan(eta) else fmt_duration(eta)}")
    return "; ".join(parts)


class SweepProgress(Callback):
    """Driver-side console progress of a sweep (see the module docstring)."""

    def __init__(self, total: int, num_tasks: int, objective: str, mode: str = "max", in_place: bool | None = None,
                 plain_every_s: float = 60.0, stream: Any = None) -> None:
        self.total = total
        self.num_tasks = max(1, num_tasks)
        self.objective = objective
        self.sign = 1 if mode == "max" else -1
        self.in_place = in_place
        self.plain_every_s = plain_every_s
        self.stream = stream
        self.t0: float | None = None
        self._last_text = ""
        self._last_plain = 0.0
        self._shown = False  # an in-place line is on the screen
        self.lines: list[str] = []  # what it printed (finished-trial lines), for the tests

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment
        state = self.__dict__.copy()
        state.update(stream=None, t0=None, _shown=False, lines=[])
        return state

    # -- output ----------------------------------------------------------------------------------
    def _out(self) -> Any:
        return self.stream or sys.stderr

    def _tty(self) -> bool:
        if self.in_place is None:
            try:
                self.in_place = bool(self._out().isatty())
            except (AttributeError, ValueError):
                self.in_place = False
        return bool(self.in_place)

    def _write(self, text: str, transient: bool = False) -> None:
        out = self._out()
        if self._tty():
            if transient:  # one screen row, or "\r\033[K" would clear only the last of its rows
                import shutil

                width = shutil.get_terminal_size().columns - 1
                text = text if len(text) <= width else text[: max(0, width - 3)] + "..."
            out.write("\r\033[K" + text + ("" if transient else "\n"))
            self._shown = transient
        else:
            out.write(text + "\n")
        out.flush()

    # -- state of the sweep ----------------------------------------------------------------------
    def _outcome(self, trial: Any) -> str:
        status = getattr(trial, "status", "")
        if status == "ERROR":
            return FAILED
        if status != "TERMINATED":
            return "running" if status == "RUNNING" else "pending"
        outcome = classify(trial.last_result or {}, num_tasks=self.num_tasks)
        if outcome == DIVERGED_OUTCOME:
            return FAILED
        return PRUNED if outcome == NOT_RUN else outcome

    def state(self, trials: list[Any]) -> tuple[dict[str, int], tuple[float, dict[str, Any]] | None, float]:
        """(counts by outcome, the best completed trial's (value, params), share of task steps done)."""
        counts: dict[str, int] = {}
        best: tuple[float, dict[str, Any]] | None = None
        steps = 0
        for t in trials:
            outcome = self._outcome(t)
            if outcome == "pending":
                continue
            counts[outcome] = counts.get(outcome, 0) + 1
            result = t.last_result or {}
            steps += self.num_tasks if outcome != "running" else min(self.num_tasks, int(result.get(TASKS_DONE) or 0))
            value = result.get(OBJECTIVE)
            if outcome == COMPLETED and value is not None and math.isfinite(float(value)):
                if best is None or self.sign * float(value) > self.sign * best[0]:
                    best = (float(value), dict(t.config or {}))
        return counts, best, steps / (self.total * self.num_tasks) if self.total else 0.0

    def refresh(self, trials: list[Any], force: bool = False) -> str:
        """Show the progress line (in place on a terminal; else at most every ``plain_every_s``)."""
        now = time.time()
        if self.t0 is None:
            self.t0 = now
        counts, best, fraction = self.state(trials)
        text = progress_text(counts, self.total, best, self.objective, now - self.t0, fraction)
        if self._tty():
            if text != self._last_text or force:
                self._write(text, transient=True)
        elif force or (text != self._last_text and now - self._last_plain >= self.plain_every_s):
            self._write(text)
            self._last_plain = now
        self._last_text = text
        return text

    def trial_line(self, trial: Any, error: bool = False) -> str:
        """One line for a finished trial: outcome, objective, tasks, parameters, duration."""
        result = trial.last_result or {}
        outcome = FAILED if error else classify(result, num_tasks=self.num_tasks)
        value = result.get(OBJECTIVE)
        shown = f" {self.objective} {float(value):.3f}" if value is not None and outcome in (COMPLETED, PRUNED) else ""
        done = int(result.get(TASKS_DONE) or 0)
        took = float(result.get("time_total_s") or 0.0)
        return (f"trial {trial.trial_id} {outcome}{shown} after {done}/{self.num_tasks} tasks in {fmt_duration(took)}: "
                f"{fmt_params(dict(trial.config or {})) or 'paper defaults'}")

    # -- Tune hooks ------------------------------------------------------------------------------
    def setup(self, *args: Any, **info: Any) -> None:
        self.t0 = time.time()

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self.refresh(trials)

    def _finished(self, trials: list[Any], trial: Any, error: bool) -> None:
        line = self.trial_line(trial, error=error)
        self.lines.append(line)
        self._write(line)
        self.refresh(trials, force=self._tty())

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._finished(trials, trial, error=False)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._finished(trials, trial, error=True)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        if self._tty():
            if self._shown:
                self._out().write("\n")
                self._out().flush()
                self._shown = False
        else:
            self.refresh(trials, force=True)

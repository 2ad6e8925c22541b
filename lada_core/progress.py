"""Progress of long work (encoding a cache, pretraining the mini CLIP) on standard error.

On a terminal, a tqdm bar rewritten in place. Elsewhere (a pipe, a log file, CI), tqdm's
carriage-return updates would be a hundred lines; there it is one plain line at each quarter of the
work instead, and nothing at the end (the caller says when it is done)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """``update(k)`` after each piece of work; ``set_postfix(name=value)`` for a figure shown beside
    (a running loss); ``close()`` at the end. ``enabled=False`` prints nothing."""

    def __init__(self, total: int, desc: str, unit: str, units: str | None = None, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        from tqdm import tqdm

        self.stream = stream or sys.stderr
        self.total, self.desc, self.units = total, desc, units or f"{unit}s"
        self.enabled = enabled
        self.tty = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.plain = enabled and not self.tty
        self.bar: Any = tqdm(total=total, desc=desc, unit=unit, disable=not self.tty, file=self.stream, dynamic_ncols=True,
                             mininterval=1.0)
        self.n, self.quarter, self.t0 = 0, max(1, total // 4), time.time()
        self.postfix = ""

    def set_postfix(self, **values: Any) -> None:
        self.bar.set_postfix(refresh=False, **values)
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def update(self, k: int = 1) -> None:
        before, self.n = self.n, self.n + k
        self.bar.update(k)
        if self.plain and self.n < self.total and self.n // self.quarter > before // self.quarter:
            extra = f", {self.postfix}" if self.postfix else ""
            print(f"{self.desc}: {self.n}/{self.total} {self.units} in {time.time() - self.t0:.0f}s{extra}", file=self.stream, flush=True)

    def close(self) -> None:
        self.bar.close()

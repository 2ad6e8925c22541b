"""The MLflow writer of a sweep's driver: ONE queue of metric points and ONE background thread for
every MLflow call that can wait, so that MLflow I/O stays off Tune's driver loop.

Metrics are queued and sent with ``log_batch`` (up to 1000 per call, grouped per run). If the
tracking server is unreachable, the first failed call marks MLflow down for ``retry_after_s``, during
which no call is tried (none blocks Tune's loop); what failed is queued again (metric points) or kept
(trial ends, :meth:`defer`) and sent once a retry succeeds.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from sweeps.tracking.store import MAX_BATCH

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient

logger = logging.getLogger("sweeps.tracking")


class MlflowWriter:
    """One queue, one thread, MLflow's availability (see the module docstring). ``background=False``
    runs every job at once, in the caller's thread (tests)."""

    def __init__(self, tracking_uri: str, sweep_name: str = "", background: bool = True, retry_after_s: float = 30.0) -> None:
        self.tracking_uri = tracking_uri
        self.sweep_name = sweep_name
        self.background = background
        self.retry_after_s = retry_after_s
        self._reset()

    def _reset(self) -> None:
        self._client: MlflowClient | None = None
        self._pending: list[tuple[str, Any]] = []  # (run id, Metric)
        self._deferred: dict[str, Any] = {}  # trial id -> a trial end not written yet
        self._executor: Any = None
        self._futures: list[Any] = []
        self._lock = threading.Lock()
        self._down_until = 0.0  # monotonic time before which MLflow is not tried (after a failure)
        self._down_since: float | None = None
        self._last_flush = time.monotonic()
        self.calls = 0  # MLflow requests made (for the overhead figures)

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("tracking_uri", "sweep_name", "background", "retry_after_s")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    # -- availability ----------------------------------------------------------------------------
    def available(self) -> bool:
        """False while MLflow is considered down (a call failed less than ``retry_after_s`` ago)."""
        return time.monotonic() >= self._down_until

    def mark_down(self, exc: BaseException) -> None:
        first = self._down_since is None
        self._down_until = time.monotonic() + self.retry_after_s
        if first:
            self._down_since = time.time()
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            logger.warning(
                "MLflow at %s is unreachable (%s); the sweep goes on, Ray keeps every result; retrying every %.0fs "
                "(anything still missing at the end: python -m sweeps.report --name %s --sync-mlflow)",
                self.tracking_uri, text, self.retry_after_s, self.sweep_name or "NAME",
            )

    def mark_up(self) -> None:
        if self._down_since is not None:
            logger.warning("MLflow at %s is reachable again; sending what was queued", self.tracking_uri)
        self._down_since = None
        self._down_until = 0.0

    def retry_now(self) -> None:
        """Try MLflow at the next call, whatever the retry timer says (the end of the sweep)."""
        self._down_until = 0.0

    # -- the queue -------------------------------------------------------------------------------
    def enqueue(self, items: list[tuple[str, Any]]) -> int:
        """Queue metric points; returns the queue's length."""
        with self._lock:
            self._pending.extend(items)
            return len(self._pending)

    def due(self, interval_s: float) -> bool:
        return bool(self._pending) and time.monotonic() - self._last_flush >= interval_s

    def defer(self, tid: str, end: Any) -> None:
        with self._lock:
            self._deferred[tid] = end

    def take_deferred(self) -> list[Any]:
        with self._lock:
            deferred, self._deferred = dict(self._deferred), {}
        return list(deferred.values())

    def has_deferred(self) -> bool:
        return bool(self._deferred)

    def unsent(self) -> tuple[int, int]:
        """(metric points queued, trial ends not written) - nonzero only if MLflow was unreachable."""
        with self._lock:
            return len(self._pending), len(self._deferred)

    # -- the thread ------------------------------------------------------------------------------
    def submit(self, fn: Any, *args: Any) -> None:
        if not self.background:
            fn(*args)
            return
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lada-mlflow")
        self._futures = [f for f in self._futures if not f.done()]
        self._futures.append(self._executor.submit(fn, *args))

    def drain(self) -> None:
        """Wait for the background MLflow work."""
        for f in list(self._futures):
            try:
                f.result()
            except Exception as exc:  # pragma: no cover - the jobs log their own errors
                logger.warning("MLflow: background work failed: %s", exc)
        self._futures = []

    def close(self) -> None:
        self.drain()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def flush(self) -> bool:
        """Send the queued metrics. False if MLflow failed (the metrics stay queued for a retry);
        with ``background`` the sending is queued and True returned."""
        self._last_flush = time.monotonic()
        if not self.available():
            return False  # kept queued until a retry
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return True
        if self.background:
            self.submit(self._send, batch)
            return True
        return self._send(batch)

    def _send(self, batch: list[tuple[str, Any]]) -> bool:
        by_run: dict[str, list[Any]] = {}
        for run_id, metric in batch:
            by_run.setdefault(run_id, []).append(metric)
        ok = True
        for run_id, items in by_run.items():
            try:
                for i in range(0, len(items), MAX_BATCH):
                    self.client.log_batch(run_id, metrics=items[i : i + MAX_BATCH])
                    self.calls += 1
            except Exception as exc:
                ok = False
                self.mark_down(exc)
                logger.info("MLflow: could not log %d metrics of run %s (kept for a retry): %s", len(items), run_id, exc)
                with self._lock:
                    self._pending[:0] = [(run_id, m) for m in items]
        if ok:
            self.mark_up()
        return ok

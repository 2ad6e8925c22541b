"""A results folder that cannot be written (disk full, read-only, no permission) stops the sweep cleanly.

Retrying cannot help a trial whose checkpoint does not fit on the disk, and every other trial would
fail the same way. So:

- before anything runs, :func:`check_writable` probes the sweep's folder and fails with one line that
  names the path (a read-only mount, a path under a file, no permission);
- during the sweep, a trial that meets such an error (:func:`describe` recognises it in an exception
  chain: ``OSError`` errno ENOSPC / EROFS / EDQUOT / EACCES / EPERM, pyarrow's and sqlite's messages)
  reports it as a result (``storage_error``) instead of raising, and waits;
- :class:`StorageGuard`, a driver-side Tune callback, sees that result (or Ray's own log records of a
  failed experiment-state upload) and interrupts Tune the way Ctrl+C does (SIGUSR1, which Tune
  handles): trials stay resumable, nothing is marked finished, finished trials are left as they are.
  :mod:`sweeps.run` then prints one line naming the path and exits with :data:`EXIT_STORAGE`.

Finished trials stay intact on a full disk: Ray's driver re-uploads its whole experiment folder
(every trial's ``result.json``, ``progress.csv``, the experiment state) at every snapshot, writing each
file in place, so an upload that meets a full disk truncates files of trials that finished long ago.
While a sweep runs, the guard makes the driver's uploads to a local or mounted folder write only the
files that changed, each to a temporary name renamed over the old one (:func:`upload_changed`): a
failed write leaves the previous version whole.
"""

from __future__ import annotations

import errno
import filecmp
import fnmatch
import logging
import os
import re
import shutil
import signal
import threading
import uuid
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.stopper import Stopper

from sweeps.results import STORAGE_ERROR

EXIT_STORAGE = 3
"""Exit code of ``lada-sweep`` stopped by a storage error."""

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
READONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
STORAGE_ERRNOS = FULL_ERRNOS | READONLY_ERRNOS

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"no space left on device", re.I), os.strerror(errno.ENOSPC)),
    (re.compile(r"disk quota exceeded", re.I), os.strerror(errno.EDQUOT)),
    (re.compile(r"database or disk is full", re.I), f"{os.strerror(errno.ENOSPC)} (sqlite: database or disk is full)"),
    (re.compile(r"read-only file system", re.I), os.strerror(errno.EROFS)),
    (re.compile(r"attempt to write a readonly database", re.I), "read-only database"),
)
_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]", re.I)
_PATH_IN_TEXT = re.compile(r"""['"](/[^'"\n]{1,400})['"]""")



def _chain(exc: BaseException | None) -> list[BaseException]:
    """The exception, its causes and contexts (and the cause inside a Ray task error), no repeats."""
    out: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is seen for seen in out) or len(out) > 20:
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        inner = getattr(e, "as_instanceof_cause", None)
        if callable(inner):
            try:
                todo.append(inner())
            except Exception:
                pass
    return [e for e in out if isinstance(e, BaseException)]


def describe(exc: BaseException | None, path: str | Path | None = None) -> str | None:
    """A one-line description of a storage failure in ``exc`` (None if it is not one). Names the path
    from the error when it has one, else ``path`` (what was being written)."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            where = e.filename or path
            reason = os.strerror(e.errno)  # pyarrow's strerror is a whole sentence
            return f"{reason}: {where}" if where else reason
    for e in _chain(exc):
        text = str(e)
        found = describe_text(text, path)
        if found:
            return found
    return None


def describe_text(text: str, path: str | Path | None = None) -> str | None:
    """The same as :func:`describe` for an error message (pyarrow, sqlite and Ray wrap the OSError)."""
    reason = None
    m = _ERRNO_IN_TEXT.search(text)
    if m and int(m.group(1)) in STORAGE_ERRNOS:
        reason = os.strerror(int(m.group(1)))
    else:
        for pattern, name in _PATTERNS:
            if pattern.search(text):
                reason = name
                break
    if reason is None:
        return None
    pm = _PATH_IN_TEXT.search(text)
    where = pm.group(1) if pm else path
    return f"{reason}: {where}" if where else reason


def check_writable(folder: str | Path) -> None:
    """Probe that ``folder`` can be created and written (a small file, written, fsynced, removed),
    leaving no trace (folders it had to create are removed again). Raises :class:`StorageError`
    with a one-line message naming the path when it cannot."""
    p = Path(folder)
    created: list[Path] = []
    try:
        missing = []
        q = p
        while not q.exists() and q != q.parent:
            missing.append(q)
            q = q.parent
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        probe = p / f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            with open(probe, "wb") as f:
                f.write(b"0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        where = exc.filename or str(p)
        reason = exc.strerror or str(exc)
        raise StorageError(f"the results folder cannot be written: {reason}: {where}") from None
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass


class StorageError(OSError):
    """The sweep's storage cannot be written (one-line message naming the path)."""


_active: StorageGuard | None = None


def report_failure(exc: BaseException, path: str | Path | None = None) -> bool:
    """Hand a storage failure met in the driver (e.g. by the Optuna storage next to the results) to
    the running sweep's guard. True if it was one and a guard took it (the caller goes on quietly)."""
    found = describe(exc, path)
    if found is None or _active is None:
        return False
    _active.trip(found)
    return True


def upload_changed(local_path: str, fs: Any, fs_path: str, exclude: list[str] | None = None) -> int:
    """Copy the files of ``local_path`` that differ from their copy under ``fs_path`` (a local
    filesystem path), each written to a temporary name and renamed into place; unchanged files are
    not touched. ``exclude``: fnmatch patterns over paths relative to ``local_path`` (as Ray's).
    Returns the number of files written."""
    root = Path(local_path)
    written = 0
    for src in sorted(root.rglob("*")):
        if not src.is_file():
            continue
        rel = src.relative_to(root).as_posix()
        if exclude and any(fnmatch.fnmatch(rel, pattern) for pattern in exclude):
            continue
        dst = Path(fs_path, rel)
        try:
            if dst.is_file() and dst.stat().st_size == src.stat().st_size and filecmp.cmp(src, dst, shallow=False):
                continue
        except OSError:
            pass
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        written += 1
    return written


class _SafeUpload:
    """Ray's driver-side ``_upload_to_fs_path`` for a local destination: :func:`upload_changed`."""

    def __init__(self, original: Any) -> None:
        self.original = original

    def __call__(self, local_path: str, fs: Any, fs_path: str, exclude: list[str] | None = None) -> None:
        import pyarrow.fs as pafs

        if isinstance(fs, pafs.LocalFileSystem) and os.path.isdir(local_path):
            upload_changed(local_path, fs, fs_path, exclude)
        else:
            self.original(local_path=local_path, fs=fs, fs_path=fs_path, exclude=exclude)


class _Filter(logging.Filter):
    def __init__(self, guard: StorageGuard) -> None:
        super().__init__()
        self.guard = guard

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        found = describe(exc, self.guard.folder) if exc is not None else None
        if found is None and record.levelno >= logging.WARNING:
            found = describe_text(record.getMessage(), None)
            if found and not found.split(": ", 1)[-1].startswith("/"):
                found = f"{found}: {self.guard.folder}"
        if found:
            self.guard.trip(found)
            return False  # lada-sweep prints one line for it instead of Ray's traceback
        if self.guard.tripped and record.name.startswith("ray.tune") and record.levelno >= logging.WARNING:
            return False  # Tune's "stop signal received", "trials did not complete": ours is the reason
        return True


class StorageGuard(Callback, Stopper):
    """Driver-side: interrupt the sweep at the first storage failure (see the module docstring).

    Also a :class:`~ray.tune.stopper.Stopper`, used only when Tune's interrupt handler is not
    installed (a driver outside the main thread): then the remaining trials are stopped instead."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.message: str | None = None
        self._signalled = False
        self._filters: list[tuple[logging.Logger, _Filter]] = []
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"])  # type: ignore[misc]

    @property
    def tripped(self) -> bool:
        return self.message is not None

    def trip(self, message: str) -> None:
        with self._lock:
            if self.message is not None:
                return
            self.message = message
            handler = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
            if callable(handler):
                self._signalled = True
                os.kill(os.getpid(), signal.SIGUSR1)  # Tune's handler: end the run as on Ctrl+C

    # -- tune.Callback ----------------------------------------------------------------------------
    def setup(self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None, **info: Any) -> None:
        global _active
        _active = self
        self.install_filters()

    def install_filters(self) -> None:
        """Take over storage-failure log records of Ray's driver, and make its uploads to a local
        folder write changed files atomically (see the module docstring). Undone by
        :meth:`remove_filters`."""
        from sweeps import ray_compat

        ray_compat.wrap_uploads(_SafeUpload, _SafeUpload)
        if self._filters:
            return
        for name in ray_compat.storage_loggers():
            logger = logging.getLogger(name)
            f = _Filter(self)
            logger.addFilter(f)
            self._filters.append((logger, f))

    def remove_filters(self) -> None:
        for logger, f in self._filters:
            logger.removeFilter(f)
        self._filters = []
        from sweeps import ray_compat

        ray_compat.unwrap_uploads(_SafeUpload)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        message = result.get(STORAGE_ERROR)
        if message:
            self.trip(str(message))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.persist(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.persist(trial)

    def persist(self, trial: Any) -> None:
        """Write a trial that just ended to storage now (its files do not change any more), rather
        than at Tune's next experiment snapshot: a disk that fills up later cannot cost its last
        results. Local or mounted storage only (cloud storage is Ray's periodic upload)."""
        import pyarrow.fs as pafs

        from sweeps import ray_compat

        where = ray_compat.trial_storage(trial)
        if where is None:
            return
        local, remote, fs = where
        if not (local and remote and os.path.isdir(local) and isinstance(fs, pafs.LocalFileSystem)):
            return
        try:
            upload_changed(local, fs, remote)
        except Exception as exc:
            found = describe(exc, remote)
            if found:
                self.trip(found)
            else:
                logging.getLogger(__name__).debug("could not write trial %s to %s: %s", trial, remote, exc)

    # -- tune.Stopper -----------------------------------------------------------------------------
    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.tripped and not self._signalled

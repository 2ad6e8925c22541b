"""What ``lada-sweep`` shows on the console, and where the rest goes.

By default (``--verbose 0``) the console holds a header, one progress line, one line per finished
trial (:mod:`sweeps.progress`) and the summary. The Python logging of Ray, Tune, Optuna, MLflow and
the sweep layer goes to ``lada-sweep.log`` in the sweep's folder (:class:`QuietLogs`); the sweep
layer's own warnings (MLflow unreachable, a guarantee switched off) still reach the console. The
trials' output (per-epoch lines) stays in the worker logs of Ray's session folder
(``ray.init(log_to_driver=False)``). ``--verbose 1`` and ``2`` keep Ray's and the libraries' own
console output as before (Tune's tables; ``2``: one line per result) and the worker lines.

Ray 2.59+ warns, on every start of a local instance, that token authentication is enabled; the
notice comes from the logger :data:`RAY_AUTH_NOTICE_LOGGER` and is dropped for local instances.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

LOG_FILE = "lada-sweep.log"
LIBRARY_LOGGERS = ("ray", "optuna", "mlflow", "alembic", "py.warnings", "lada_core", "sweeps")
"""Loggers whose records go to the log file (and, with ``--verbose 0``, nowhere else)."""
OWN_LOGGER = "sweeps"
QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "MLFLOW_CONFIGURE_LOGGING": "false"}
"""Set (unless the user set them) for ``--verbose 0``; both are public switches of Ray and MLflow."""
RAY_AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
"""Where Ray 2.60's "Token authentication is enabled for this Ray cluster" warning comes from
(checked by a test against the installed Ray)."""
RAY_AUTH_NOTICE = "Token authentication is enabled"


class _QuietFileHandler(logging.FileHandler):
    """A file handler that creates its file (and folder) at the first record, and goes silent on a
    write error (a full disk or a read-only folder must not print tracebacks: the storage guard
    reports those, in one line)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.stream is None:
                Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
            super().emit(record)
        except Exception:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        self.setLevel(logging.CRITICAL + 1)
        self.close()


class _DropAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return RAY_AUTH_NOTICE not in record.getMessage()


def log_path(folder: str, name: str) -> Path:
    """The sweep's log file: ``lada-sweep.log`` in its (local) folder, created at its first record
    (nothing is written for a sweep that stops at its inputs); for a cloud folder, a file in the
    temporary folder."""
    if "://" not in folder:
        return Path(folder).resolve() / LOG_FILE
    return Path(tempfile.gettempdir()) / f"lada-sweep-{name}.log"


class QuietLogs:
    """Route the libraries' logging to a file for the length of a sweep (``with QuietLogs(...)``).

    ``verbose == 0``: the loggers of :data:`LIBRARY_LOGGERS` write to the file only (the sweep
    layer's warnings also to stderr); ``verbose >= 1``: to the file as well as where they wrote
    before. Enter it after ``import ray`` (Ray installs its console handler when imported). What it
    changed is undone on exit."""

    def __init__(self, path: Path, verbose: int = 0, local_ray: bool = True, stream: TextIO | None = None) -> None:
        self.path = path
        self.verbose = verbose
        self.local_ray = local_ray
        self.stream = stream
        self.handler: logging.Handler | None = None
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool, int]] = []
        self._console: logging.Handler | None = None
        self._auth_filter = _DropAuthNotice()
        self._warnings_captured = False
        self._env_set: list[str] = []

    def _quiet_env(self) -> None:
        """``--verbose 0``: Tune's legacy reporter (silent at verbosity 0; the new one prints its
        configuration box whatever the verbosity) and MLflow's loggers left to this class."""
        import os

        for key, value in QUIET_ENV.items():
            if key not in os.environ:
                os.environ[key] = value
                self._env_set.append(key)
        try:
            import optuna

            optuna.logging.disable_default_handler()  # its handler goes to stderr (added at first use)
        except ImportError:
            pass

    def __enter__(self) -> QuietLogs:
        if self.verbose == 0:
            self._quiet_env()
        self.handler = _QuietFileHandler(self.path, mode="a", encoding="utf-8", delay=True)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handler.setLevel(logging.INFO)
        self._console = logging.StreamHandler(self.stream or sys.stderr)
        self._console.setLevel(logging.WARNING)
        self._console.setFormatter(logging.Formatter("%(message)s"))
        for name in LIBRARY_LOGGERS:
            lg = logging.getLogger(name)
            self._saved.append((lg, list(lg.handlers), lg.propagate, lg.level))
            if self.verbose == 0:
                lg.handlers = [self.handler]
                lg.propagate = False
            else:
                lg.addHandler(self.handler)
            if lg.level == logging.NOTSET:
                lg.setLevel(logging.WARNING if name == "alembic" else logging.INFO)
        own = logging.getLogger(OWN_LOGGER)
        if self.verbose == 0 or not own.handlers or own.handlers == [self.handler]:
            own.addHandler(self._console)  # the sweep's own warnings stay on the console
        if self.local_ray:
            logging.getLogger(RAY_AUTH_NOTICE_LOGGER).addFilter(self._auth_filter)
        if not logging.getLogger("py.warnings").disabled:
            logging.captureWarnings(True)
            self._warnings_captured = True
        return self

    def __exit__(self, *exc: Any) -> None:
        for lg, handlers, propagate, level in reversed(self._saved):
            lg.handlers = handlers
            lg.propagate = propagate
            lg.setLevel(level)
        self._saved.clear()
        logging.getLogger(RAY_AUTH_NOTICE_LOGGER).removeFilter(self._auth_filter)
        if self._warnings_captured:
            logging.captureWarnings(False)
        if self.handler is not None:
            self.handler.close()
        import os

        for key in self._env_set:
            os.environ.pop(key, None)
        self._env_set.clear()


def drop_ray_auth_notice() -> None:
    """Drop Ray's local token-authentication notice (also outside :class:`QuietLogs`)."""
    logging.getLogger(RAY_AUTH_NOTICE_LOGGER).addFilter(_DropAuthNotice())


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: the tracking server's own address, or, for a local store,
    where ``mlflow ui`` serves it by default (``http://127.0.0.1:5000``)."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def header_lines(s: Any, objective: str, log: Path, mlflow_url: str, worker_logs: str | None) -> list[str]:
    """The header ``lada-sweep`` prints before the trials: what is searched, where everything goes."""
    space = f"space {s.space}, {s.num_samples} trials, objective {objective} ({s.mode}), {s.num_tasks} tasks, scheduler {s.scheduler}"
    lines = [
        f"lada-sweep: {s.name}: {space}",
        f"  results {s.folder}  (study {s.study_storage})",
        f"  MLflow  {mlflow_url}  (store {s.mlflow_uri}, parent run {s.parent_run_id})",
        f"  log     {log}" + (f"  (trials' output: {worker_logs})" if worker_logs else ""),
    ]
    return lines

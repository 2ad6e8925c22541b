"""The Optuna study of a sweep: where it is stored, opening it (with retries when another process
creates the same new database at the same moment), loading it, the sampler. Imports no Ray: the report
and notebooks open a sweep's study without it.
"""

from __future__ import annotations

from pathlib import Path

import optuna

RAY_TRIAL_ID_ATTR = "ray_trial_id"
"""User attribute of an Optuna trial: the Tune trial that ran it."""
STUDY_FILE = "optuna.db"


def storage_url_for(folder: str | Path) -> str:
    """The default study storage of a sweep folder: ``sqlite:///<folder>/optuna.db``."""
    return f"sqlite:///{Path(folder).resolve() / STUDY_FILE}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL (``sqlite:///...``, ``postgresql://...``) or a journal file path
    (``*.log`` / ``*.jsonl``)."""
    if "://" not in url:
        path = Path(url)
        if path.suffix in (".log", ".jsonl", ".journal"):
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        url = f"sqlite:///{path.resolve()}"
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return _rdb_storage(url)


def _rdb_storage(url: str, attempts: int = 6) -> optuna.storages.RDBStorage:
    """``RDBStorage(url)``, again after a short wait when another process initialised the same new
    database at the same moment, or held it locked. Each process makes the tables it does not see
    and stamps the schema version, so the slower one meets the faster one's work: "table studies
    already exists", or the stamp's "UNIQUE constraint failed: alembic_version". Seen when
    ``lada-sweep-report`` (or a test, or a notebook) opens a sweep's study just as the sweep creates
    it. Anything else (a full disk, a bad URL) is raised at once."""
    import time

    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(1, attempts):
        try:
            return optuna.storages.RDBStorage(url)
        except (IntegrityError, OperationalError) as exc:
            text = str(exc)
            if not (isinstance(exc, IntegrityError) or "database is locked" in text or "already exists" in text):
                raise
            time.sleep(0.2 * attempt)
    return optuna.storages.RDBStorage(url)  # the last attempt raises whatever it meets


def storage_file(url: str) -> str | None:
    """The file behind an Optuna storage URL (a sqlite database, a journal file), for error
    messages; None for a database server."""
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///"):]
    if "://" not in url:
        return str(Path(url).resolve())
    return None


def study_exists(storage: optuna.storages.BaseStorage, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
        return True
    except KeyError:
        return False


def load_study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url))


def make_sampler(seed: int | None) -> optuna.samplers.BaseSampler:
    """TPE, seeded (multivariate with a constant liar for parallel trials is Optuna 5's default)."""
    return optuna.samplers.TPESampler(seed=seed)

"""``python sweeps/run.py`` and ``python -m sweeps.run``: the ``lada-sweep`` command (:func:`sweeps.cli.main`).

The sweep layer itself: :mod:`sweeps.cli` (flags, exit codes) -> :mod:`sweeps.settings` (frozen
settings, resume identity) -> :mod:`sweeps.plan` (every check, before anything runs) ->
:mod:`sweeps.runner` (Ray, the cache, MLflow, the Tuner) -> :mod:`sweeps.summary`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python sweeps/run.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sweeps.cli import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

"""Registry of define-by-run search spaces for LADA sweeps.

A space is a module of this package whose file name is its registry name. It defines

- ``space(trial) -> dict | None``: a define-by-run function (``trial.suggest_*`` with dotted config
  names such as ``lada.memory_size``); it may return constants, and does no computation. The same
  function drives plain Optuna and Ray Tune's ``OptunaSearch``.
- ``METRIC`` and ``MODE``: the default objective (a name of :mod:`lada_core.metrics`) and direction.
- ``DESCRIPTION`` (one line) and ``NUM_SAMPLES`` (the default number of trials).
- optionally ``BASE``: constants applied to the sweep's base config before the feature cache is built
  (schedule, shots, a small model): the same for every trial of the sweep.
- optionally ``GRID``: ``{name: [values]}``; the sweep then evaluates exactly this grid, in order.
- ``FIRST_POINT``: the paper's defaults for the suggested names (evaluated first).
- optionally ``SCHEDULER``: ``"fifo"`` (default) or ``"asha"``, the default of ``--scheduler``.

``get_space(name)`` resolves a name through the explicit :data:`REGISTRY`; an unknown name raises
:class:`UnknownSpaceError` listing the valid ones.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lada_core import metrics

if TYPE_CHECKING:  # pragma: no cover
    import optuna

REGISTRY: tuple[str, ...] = ("lada_ablation", "lada_full", "lada_grid", "lada_paper", "lada_smoke")
"""Every registered space; each is the module ``search_spaces/<name>.py``."""

MODES = ("max", "min")


class UnknownSpaceError(ValueError):
    """An unknown space name; the message lists the valid names."""


SpaceFn = Callable[["optuna.Trial"], "dict[str, Any] | None"]


@dataclass(frozen=True)
class SearchSpace:
    """A resolved registry entry."""

    name: str
    fn: SpaceFn
    metric: str
    mode: str
    description: str
    num_samples: int
    first_point: Mapping[str, Any] = field(default_factory=dict)
    base: Mapping[str, Any] = field(default_factory=dict)
    grid: Mapping[str, list[Any]] | None = None
    scheduler: str = "fifo"

    def points_to_evaluate(self) -> list[dict[str, Any]]:
        """The points to enqueue, in order: the paper defaults first, then (for grids) the grid."""
        points: list[dict[str, Any]] = []
        if self.first_point:
            points.append(dict(self.first_point))
        if self.grid:
            keys = list(self.grid)
            for values in itertools.product(*(self.grid[k] for k in keys)):
                point = dict(zip(keys, values, strict=True))
                if point not in points:
                    points.append(point)
        return points

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """Run the define-by-run function on an Optuna trial; returns every dotted name it set."""
        captured: dict[str, Any] = {}

        class _Captor:
            def __getattr__(self, item: str) -> Any:
                attr = getattr(trial, item)
                if item.startswith("suggest_") and callable(attr):

                    def wrapper(name: str, *args: Any, **kwargs: Any) -> Any:
                        value = attr(name, *args, **kwargs)
                        captured[name] = value
                        return value

                    return wrapper
                return attr

        constants = self.fn(_Captor())  # type: ignore[arg-type]
        return {**captured, **(constants or {})}


def _show(value: Any, limit: int = 60) -> str:
    """A name as it appears in a one-line message: repr (escapes newlines), cut to ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def space_names() -> list[str]:
    return sorted(REGISTRY)


def get_space(name: str) -> SearchSpace:
    """Resolve a registry name to a :class:`SearchSpace`."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise UnknownSpaceError(f"unknown search space {_show(name)} (valid: {', '.join(space_names())})")
    module = importlib.import_module(f"{__name__}.{name}")
    metric = getattr(module, "METRIC", metrics.AVERAGE)
    mode = getattr(module, "MODE", "max")
    if mode not in MODES:  # pragma: no cover - a programming error in a space module
        raise ValueError(f"space {name}: MODE must be one of {MODES}, got {mode!r}")
    return SearchSpace(
        name=name,
        fn=module.space,
        metric=metric,
        mode=mode,
        description=getattr(module, "DESCRIPTION", ""),
        num_samples=int(getattr(module, "NUM_SAMPLES", 1)),
        first_point=dict(getattr(module, "FIRST_POINT", {})),
        base=dict(getattr(module, "BASE", {})),
        grid=getattr(module, "GRID", None),
        scheduler=getattr(module, "SCHEDULER", "fifo"),
    )


def paper_defaults(*names: str) -> dict[str, Any]:
    """The paper's default value of each dotted name (the defaults of :class:`lada_core.config.Config`)."""
    from lada_core.config import Config

    flat = Config().flat()
    return {n: flat[n] for n in names}


__all__ = ["REGISTRY", "SearchSpace", "UnknownSpaceError", "get_space", "paper_defaults", "space_names"]

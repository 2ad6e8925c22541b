"""Benchmark registry: ``get_benchmark(name, ...)`` -> :class:`Benchmark`.

Built-in names: ``mini-tail`` (offline; Fashion-MNIST + scikit-learn digits). Other modules add
theirs with :func:`register`. A name that ends in ``.yaml``/``.yml`` is a user-defined benchmark file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lada_core.benchmarks.base import (
    ArrayImages,
    Benchmark,
    DataError,
    FileImages,
    ImageSource,
    Subset,
    Task,
    few_shot_indices,
)

BenchmarkFactory = Callable[..., Benchmark]
_REGISTRY: dict[str, BenchmarkFactory] = {}


def register(name: str) -> Callable[[BenchmarkFactory], BenchmarkFactory]:
    def deco(fn: BenchmarkFactory) -> BenchmarkFactory:
        _REGISTRY[name] = fn
        return fn

    return deco


def _load_builtin() -> None:
    from lada_core.benchmarks import mini_tail  # noqa: F401

    try:
        from lada_core.benchmarks import xtail  # noqa: F401
    except ImportError as exc:  # pragma: no cover - only while xtail is missing
        if "lada_core.benchmarks.xtail" not in str(exc):
            raise


def benchmark_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_benchmark(
    name: str, data_root: str | None = None, shots: int | None = None, seed: int = 1, sample_rule: str = "authors",
    **val: float,
) -> Benchmark:
    """Build a benchmark by registry name (or from a user YAML file). ``shots=None`` = full-shot;
    ``sample_rule`` (``data.sample_rule``): how few-shot images are drawn (:func:`few_shot_indices`);
    ``val``: ``val_per_class`` and ``val_fraction`` (``data.val_per_class``, ``data.val_fraction``)."""
    _load_builtin()
    if name.endswith((".yaml", ".yml")) and "user-yaml" in _REGISTRY:
        return _REGISTRY["user-yaml"](path=name, data_root=data_root, shots=shots, seed=seed, sample_rule=sample_rule, **val).validate()
    if name not in _REGISTRY:
        raise DataError(f"unknown benchmark {name!r} (valid: {', '.join(benchmark_names())}, or a .yaml file)")
    return _REGISTRY[name](data_root=data_root, shots=shots, seed=seed, sample_rule=sample_rule, **val).validate()


def benchmark_for(data: Any) -> Benchmark:
    """The benchmark a :class:`lada_core.config.DataConfig` describes (``cfg.data``)."""
    return get_benchmark(
        data.benchmark, data.data_root, data.shots, data.sample_seed, data.sample_rule,
        val_per_class=data.val_per_class, val_fraction=data.val_fraction,
    )


__all__ = [
    "ArrayImages",
    "Benchmark",
    "DataError",
    "FileImages",
    "ImageSource",
    "Subset",
    "Task",
    "benchmark_for",
    "benchmark_names",
    "few_shot_indices",
    "get_benchmark",
    "register",
]

"""``prepare(settings, options) -> SweepPlan``: every check that needs no Ray, done once, before anything
starts; the config assembled once and the points parsed once.

A bad input (a space, metric, benchmark, ``--set``, ``--point``, resource request, an existing sweep
or study of the same name, a results folder that cannot be written, model weights that cannot be had)
fails here with one line; the runner then only builds what the plan says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeps.settings import RunOptions, Settings, UsageError, is_uri, load_settings


@dataclass(frozen=True)
class SweepPlan:
    """A checked sweep: its settings, what this driver was asked, and what was derived from them."""

    settings: Settings
    options: RunOptions
    space: Any  # search_spaces.Space
    objective: Any  # sweeps.objective.Objective
    spec: Any  # sweeps.trainable.TrialSpec (no cache yet)
    cache_config: Any  # lada_core.config.Config: the data and backbone every trial shares
    points: tuple[dict[str, Any], ...]  # the space's first points, then --point ones

    @property
    def benchmark(self) -> str:
        return str(self.cache_config.data.benchmark)


def prepare(settings: Settings, options: RunOptions) -> SweepPlan:
    """Check everything that can be checked without Ray (see the module docstring)."""
    from sweeps.resources import validate_request

    space, objective, spec, cache_cfg, points = check_inputs(settings)
    validate_request(settings.cpus_per_trial, settings.gpus_per_trial or 0.0)
    check_new_or_resumed(settings, options.resume)
    return SweepPlan(settings, options, space, objective, spec, cache_cfg, tuple(points))


def check_new_or_resumed(s: Settings, resume: bool) -> None:
    """A new sweep may not reuse a name (results or study); its results folder must be writable."""
    from sweeps.optuna_storage import open_storage, study_exists

    folder = s.folder
    exists = load_settings(s.storage, s.name) is not None or (not is_uri(folder) and Path(folder).exists() and any(Path(folder).iterdir()))
    if exists and not resume:
        raise UsageError(f"sweep {s.name!r} already exists in {s.storage}: pass --resume to continue it, or choose another --name")
    if not resume and _study_file_exists(s.study_storage) and study_exists(open_storage(s.study_storage), s.name):
        raise UsageError(f"an Optuna study named {s.name!r} already exists in {s.study_storage}: pass --resume or choose another --name")
    if not is_uri(folder):
        from sweeps.storage import check_writable

        check_writable(folder)  # a read-only or impossible results folder: one line, before anything runs


def _study_file_exists(url: str) -> bool:
    """False for a sqlite/journal file that does not exist yet (checking must not create it)."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):]).exists()
    if "://" not in url:
        return Path(url).exists()
    return True


def _clip(text: str, limit: int) -> str:
    """``text`` as an error message shows it: as is when short and printable, else its ``repr`` cut
    to ``limit`` characters (an escaped character takes up to ten)."""
    if len(text) <= limit and text.isprintable():
        return text
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def parse_points(items: Sequence[str], suggested: Sequence[str], spec: Any) -> list[dict[str, Any]]:
    """``--point`` strings (``KEY=VALUE[,KEY=VALUE]``) -> points for Optuna's queue. Every name must be
    one the space suggests; values are typed by the config (``1e-3`` -> float, ``8`` -> int) and must
    give a valid config. Raises :class:`UsageError` / ``ConfigError`` with one line."""
    from lada_core.config import ConfigError, parse_set

    points = []
    for item in items:
        shown = _clip(item, 120)
        point: dict[str, Any] = {}
        for part in (x.strip() for x in item.split(",")):
            if not part:
                continue
            try:
                key, value = parse_set(part)
            except ConfigError as exc:
                raise UsageError(f"--point {shown}: {str(exc).replace('--set ', '')}") from None
            if key not in suggested:
                names = ", ".join(suggested) or "none"
                key_shown = _clip(key, 80)
                raise UsageError(f"--point {shown}: {key_shown} is not a parameter of the space (it suggests: {names}); use --set for fixed settings")
            if key in point:
                raise UsageError(f"--point {shown}: {key} is given twice")
            point[key] = value
        if not point:
            raise UsageError(f"--point {shown}: expected KEY=VALUE[,KEY=VALUE]")
        try:
            flat = spec.config(point).flat()
        except ConfigError as exc:
            raise UsageError(f"--point {shown}: {exc}") from None
        points.append({k: flat[k] for k in point})
    return points


def _quiet_study(seed: int) -> Any:
    """A throwaway in-memory study with a seeded random sampler (Optuna's creation note silenced)."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    finally:
        optuna.logging.set_verbosity(level)


def suggested_names(space: Any, seed: int = 0) -> list[str]:
    """The parameter names a space suggests (from samples of a throwaway study)."""
    study = _quiet_study(seed)
    names: set[str] = set()
    for _ in range(16):  # a conditional space suggests different names on different branches
        trial = study.ask()
        space.fn(trial)
        names |= set(trial.params)
    return sorted(names)


def check_inputs(s: Settings) -> tuple[Any, Any, Any, Any, list[dict[str, Any]]]:
    """Everything about the inputs that can be checked without Ray: returns (space, objective,
    TrialSpec, the cache's config, the parsed ``--point`` points after the space's own)."""
    from lada_core.backbone import check_weights_available
    from lada_core.benchmarks import benchmark_names
    from search_spaces import get_space
    from sweeps.objective import parse_metric

    space = get_space(s.space)
    objective = parse_metric(s.metric)
    spec = s.trial_spec(cache_path=None, objective=objective)
    cache_cfg = spec.config({})
    if cache_cfg.eval.split != "val" or cache_cfg.eval.peek_test != s.peek_test:
        raise UsageError("a sweep tunes on the validation split: eval.split and eval.peek_test are set by lada-sweep "
                         "(--peek-test adds test/... metrics); evaluate on test with lada-sweep-evaluate")
    bench = cache_cfg.data.benchmark
    if bench not in benchmark_names() and not bench.endswith((".yaml", ".yml")):
        raise UsageError(f"unknown benchmark {bench!r} (valid: {', '.join(benchmark_names())}, or a benchmark .yaml file)")
    # The driver loads the image encoder (the cache key) and every trial its text tower: weights that
    # cannot be had are an error now, not after a cluster has started.
    check_weights_available(cache_cfg.backbone.model, cache_cfg.backbone.pretrained, cache_cfg.backbone.model_config_dir)
    points = [dict(p) for p in space.points_to_evaluate()]
    points += parse_points(s.point, suggested_names(space, s.seed), spec)
    # Every point the sweep will certainly evaluate, and a few samples, must give valid configs that
    # keep the cache's data and backbone.
    study = _quiet_study(s.seed)
    samples = points + [space.sample(study.ask()) for _ in range(3)]
    for sample in samples:
        cfg = spec.config(sample)
        if cfg.data != cache_cfg.data or cfg.backbone != cache_cfg.backbone or cfg.eval != cache_cfg.eval:
            raise UsageError(f"space {space.name} changes data.* or backbone.* settings ({sample}): those define the shared feature cache")
    return space, objective, spec, cache_cfg, points

"""The search-space registry: every space samples valid configs, starts at the paper's defaults, and
an unknown name is an error that lists the valid ones."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest

import search_spaces
from lada_core import metrics as M
from lada_core.config import Config, build_config, from_dict, parameter_names
from search_spaces import REGISTRY, UnknownSpaceError, get_space, space_names

pytestmark = pytest.mark.unit

optuna.logging.set_verbosity(optuna.logging.WARNING)

CACHE_FIELDS = ("data.", "backbone.")


def test_registry_matches_the_modules() -> None:
    folder = Path(search_spaces.__file__).parent
    modules = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    assert modules == sorted(REGISTRY)
    assert {"lada_full", "lada_paper", "lada_grid", "lada_ablation", "lada_smoke"} <= set(REGISTRY)


def test_unknown_space_lists_the_valid_names() -> None:
    with pytest.raises(UnknownSpaceError) as err:
        get_space("lada_fulll")
    message = str(err.value)
    assert "lada_fulll" in message and "\n" not in message
    for name in space_names():
        assert name in message


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_space_samples_valid_configs(name: str) -> None:
    space = get_space(name)
    assert space.metric in M.METRICS and space.mode in ("max", "min")
    assert space.num_samples >= 1 and space.description
    base = build_config(sample=dict(space.base))
    valid = set(parameter_names())
    assert set(space.base) <= valid
    for sampler in (optuna.samplers.RandomSampler(seed=0), optuna.samplers.TPESampler(seed=1)):
        study = optuna.create_study(sampler=sampler, direction="maximize")
        for i in range(12):
            trial = study.ask()
            sample = space.sample(trial)
            assert set(sample) <= valid, f"unknown parameter names {set(sample) - valid}"
            assert not any(k.startswith(CACHE_FIELDS) for k in sample), "trials share one feature cache"
            cfg = from_dict(sample, base)  # raises ConfigError on a wrong type or range
            assert cfg.data == base.data and cfg.backbone == base.backbone
            study.tell(trial, float(i))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_space_computes_nothing(name: str) -> None:
    """A define-by-run function only suggests values: on a FixedTrial it returns at once."""
    space = get_space(name)
    point = space.points_to_evaluate()[0] if space.points_to_evaluate() else {}
    t0 = time.perf_counter()
    for _ in range(100):
        assert space.sample(optuna.trial.FixedTrial(point)) == point
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_first_point_is_the_paper_defaults(name: str) -> None:
    space = get_space(name)
    defaults = Config().flat()
    points = space.points_to_evaluate()
    if not space.first_point:
        assert name == "lada_paper" and points == []
        return
    assert points[0] == space.first_point
    assert all(defaults[k] == v for k, v in space.first_point.items())
    # The defaults lie inside the space: Optuna accepts them as an enqueued trial.
    study = optuna.create_study(direction="maximize")
    for point in points:
        study.enqueue_trial(point)
    for point in points:
        trial = study.ask()
        assert space.sample(trial) == {**point}
        study.tell(trial, 0.0)


def test_grids_cover_the_paper_grid_with_the_default_first() -> None:
    grid = get_space("lada_grid")
    points = grid.points_to_evaluate()
    assert len(points) == 9 == grid.num_samples
    assert points[0] == {"lada.memory_size": 16, "lada.gaussian_components": 4}
    assert {(p["lada.memory_size"], p["lada.gaussian_components"]) for p in points} == {(a, b) for a in (8, 16, 32) for b in (1, 4, 16)}
    ablation = get_space("lada_ablation").points_to_evaluate()
    assert [p["lada.variant"] for p in ablation][0] == "full"
    assert {p["lada.variant"] for p in ablation} == {"adapter_only", "adapter_replay", "adapter_units", "full"}


def test_lada_full_ranges() -> None:
    space = get_space("lada_full")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = []
    for _ in range(300):
        s = space.sample(study.ask())
        assert isinstance(s["lada.memory_size"], int) and 1 <= s["lada.memory_size"] <= 64
        assert isinstance(s["lada.gaussian_components"], int) and 1 <= s["lada.gaussian_components"] <= 16
        assert 1.0 <= s["lada.distill_weight"] <= 256.0
        assert 1e-4 <= s["optim.lr"] <= 1e-2
        assert 0.1 <= s["lada.alpha"] <= 10 and 0.1 <= s["lada.beta"] <= 10
        seen.append(s["lada.memory_size"])
    assert min(seen) <= 2 and max(seen) >= 48  # log scale reaches both ends
    assert space.scheduler == "asha"


def test_lada_smoke_is_offline_and_small() -> None:
    space = get_space("lada_smoke")
    cfg = build_config(sample=dict(space.base))
    assert cfg.backbone.model == "lada-mini" and cfg.backbone.pretrained == "lada-offline" and cfg.data.benchmark == "mini-tail"
    assert cfg.data.shots is not None and cfg.data.shots <= 16 and cfg.data.views == 0 and cfg.optim.epochs_scale <= 1.0
    assert set(space.first_point) == {"lada.memory_size", "lada.distill_weight", "lada.gaussian_components"}

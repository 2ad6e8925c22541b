"""Bad input to the sweep layer, tried systematically (hypothesis): every case is accepted or rejected
with one clear line, never a traceback.

Covered: the search-space registry (``get_space`` with random names), sampling every registered space
through Optuna (random samplers, seeds and histories: every sample is a valid config that keeps the
shared cache), a trial's config from random sample dicts (``TrialSpec.config``), ``--metric``
(``parse_metric``), ``--point``, and ``lada-sweep`` itself with random ``--set`` / ``--metric`` /
``--point`` / ``--space`` values, run in-process up to the point where it would start Ray.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import optuna
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from lada_core import metrics as M
from lada_core.config import SECTIONS, Config, ConfigError, build_config, parameter_names
from search_spaces import REGISTRY, UnknownSpaceError, get_space
from sweeps.objective import MetricError, Objective, parse_metric

pytestmark = pytest.mark.unit

optuna.logging.set_verbosity(optuna.logging.ERROR)

MAX_MESSAGE = 400
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOWER = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
NAMES = parameter_names()


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg.strip(), f"empty message from {type(exc).__name__}"
    assert "\n" not in msg and "\r" not in msg, f"multi-line message: {msg!r}"
    assert len(msg) <= MAX_MESSAGE, f"message of {len(msg)} characters: {msg[:200]!r}..."
    assert "Traceback" not in msg
    return msg


texts = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=8),
    st.sampled_from(["", " ", "\n", "\x00", "x" * 5000, "a\nb", "é", "\ud7ff", "../lada_full", "lada_full.py", "__init__",
                     "search_spaces.lada_full", "LADA_FULL", "lada_full ", " lada_full", "lada-full", "*"]),
)

# -- the registry ------------------------------------------------------------------------------------


@FAST
@given(name=st.one_of(texts, st.sampled_from(REGISTRY), st.none(), st.integers(), st.binary(max_size=6)))
@example(name="lada_full")
@example(name="x" * 100_000)
def test_get_space_accepts_registered_names_and_rejects_others_in_one_line(name: Any) -> None:
    try:
        space = get_space(name)
    except UnknownSpaceError as exc:
        msg = _one_line(exc)
        assert name not in REGISTRY
        assert all(n in msg for n in REGISTRY), "the message lists the valid names"
        return
    assert name in REGISTRY and space.name == name


# -- sampling through Optuna -------------------------------------------------------------------------
samplers = st.sampled_from(["random", "tpe", "tpe-univariate", "qmc"])


def _sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=3)
    if kind == "tpe-univariate":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=2, multivariate=False)
    return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)


@SLOWER
@given(
    name=st.sampled_from(REGISTRY),
    kind=samplers,
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    history=st.lists(st.one_of(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6),
                               st.sampled_from(["fail", "prune"])), min_size=1, max_size=10),
)
def test_every_space_samples_valid_configs_whatever_the_sampler_and_history(name: str, kind: str, seed: int, history: list[Any]) -> None:
    """Whatever the sampler, seed and told outcomes (values, FAIL, PRUNED), every sample is a set of
    known dotted names whose config is valid and keeps the shared feature cache (data, backbone)."""
    from optuna.trial import TrialState

    space = get_space(name)
    base = build_config(sample=dict(space.base))
    study = optuna.create_study(sampler=_sampler(kind, seed), direction="maximize" if space.mode == "max" else "minimize")
    for point in space.points_to_evaluate():
        study.enqueue_trial(point)
    for outcome in history:
        trial = study.ask()
        sample = space.sample(trial)
        assert set(sample) <= set(NAMES), set(sample) - set(NAMES)
        cfg = build_config(sample=sample, base=base)
        assert cfg.data == base.data and cfg.backbone == base.backbone
        if outcome == "fail":
            study.tell(trial, state=TrialState.FAIL)
        elif outcome == "prune":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, float(outcome))


# -- a trial's config from a random sample dict ----------------------------------------------------
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([2**63, 10**400, -1]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10), st.binary(max_size=4),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=5)
keys = st.one_of(
    st.sampled_from(NAMES), texts,
    st.builds(lambda s, k: f"{s}.{k}", st.sampled_from(list(SECTIONS)), st.text(max_size=10)),
    st.sampled_from(["", ".", "lada.", ".memory_size", "lada..memory_size", "lada.memory_size.x"]),
    st.integers(), st.none(),
)


@pytest.fixture(scope="module")
def smoke_spec() -> Any:
    from sweeps.trainable import TrialSpec

    space = get_space("lada_smoke")
    return TrialSpec(base_config=build_config(sample=dict(space.base)).to_dict())


SMOKE_NAMES = ["lada.memory_size", "lada.distill_weight", "lada.gaussian_components"]
numbers = st.one_of(st.floats(min_value=-1.0, max_value=300.0), st.floats(min_value=1e-6, max_value=1e-1), st.integers(min_value=-2, max_value=70),
                    st.sampled_from([0, 1, 2**63, 1e8, float("nan"), float("inf")]))
plausible = st.dictionaries(st.sampled_from([*SMOKE_NAMES, "optim.lr", "optim.epochs"]), numbers, min_size=1, max_size=4)


@FAST
@given(sample=st.one_of(st.dictionaries(keys, values, max_size=5), plausible))
@example(sample={"optim.lr": 1e8})
@example(sample={"lada.memory_size": 0})
@example(sample={"optim.lr": float("nan")})
@example(sample={"lada": {"memory_size": 8}})
def test_trial_config_from_random_sample_dicts(smoke_spec: Any, sample: dict[Any, Any]) -> None:
    """What a trial does with its sampled dict: a valid Config, or one line (the trial then fails
    with that message)."""
    try:
        cfg = smoke_spec.config(sample)
    except ConfigError as exc:
        _one_line(exc)
        event("rejected")
        return
    event("accepted")
    assert isinstance(cfg, Config)
    cfg.validate()


# -- --metric ----------------------------------------------------------------------------------------
metric_names = st.sampled_from([*M.METRICS, *(m.upper() for m in M.METRICS), " last ", "accuracy", "Last", ""])
weights = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers().map(str), texts,
                    st.sampled_from(["0", "-1", "1e400", "nan", "inf", "0.5", "1e-300", "x"]))
mixes = st.lists(st.tuples(metric_names, st.one_of(st.none(), weights), st.sampled_from(["=", ":"])), min_size=1, max_size=4).map(
    lambda parts: ",".join(n if w is None else f"{n}{sep}{w}" for n, w, sep in parts)
)


@FAST
@given(text=st.one_of(texts, mixes, metric_names))
@example(text="last=0.5,average=0.5")
@example(text="last=0,average=0")
@example(text="last=1e400")
@example(text="average," * 2000)
def test_metric_is_parsed_or_rejected_in_one_line(text: str) -> None:
    try:
        objective = parse_metric(text)
    except MetricError as exc:
        _one_line(exc)
        event("rejected")
        return
    event("accepted")
    assert isinstance(objective, Objective)
    assert objective.weights and set(objective.weights) <= set(M.METRICS)
    assert all(math.isfinite(w) and w >= 0 for w in objective.weights.values()) and sum(objective.weights.values()) > 0
    values = {m: 50.0 for m in M.METRICS}
    assert math.isfinite(objective.value(values))


# -- --point -----------------------------------------------------------------------------------------
point_values = st.one_of(st.integers(min_value=-5, max_value=100).map(str), st.floats().map(repr), texts,
                         st.sampled_from(["1e8", "3e-3", "null", "true", "[1, 2]", "{a: 1}", "!!float x", "8"]))
point_items = st.one_of(
    st.lists(st.tuples(st.one_of(st.sampled_from([*SMOKE_NAMES, "optim.epochs"]), keys.map(str)), point_values), min_size=0, max_size=3),
    st.lists(st.tuples(st.sampled_from(SMOKE_NAMES), numbers.map(repr)), min_size=1, max_size=3),
).map(lambda kv: ",".join(f"{k}={v}" for k, v in kv))


@FAST
@given(item=st.one_of(point_items, texts))
@example(item="optim.lr=1e8")
@example(item="optim.lr=1e-3,lada.memory_size=8")
@example(item="optim.epochs=3")
@example(item="lada.memory_size=0")
@example(item="lada.memory_size=0,0000\x1f\x1f\x1f\U00012544\U00018d09=0000\x1f\U00018cd6\U0001dab0\U0002ebe1\U0002ebe1" * 3)  # found in CI
def test_point_is_parsed_or_rejected_in_one_line(smoke_spec: Any, item: str) -> None:
    from sweeps.plan import parse_points, suggested_names
    from sweeps.settings import UsageError

    names = suggested_names(get_space("lada_smoke"))
    try:
        (point,) = parse_points([item], names, smoke_spec)
    except UsageError as exc:
        _one_line(exc)
        event("rejected")
        return
    event("accepted")
    assert point and set(point) <= set(names)
    smoke_spec.config(point)  # a valid config


# -- lada-sweep, in-process, up to the point where it would start Ray ------------------------------
class _WouldStartRay(Exception):
    pass


set_items = st.one_of(
    st.tuples(st.sampled_from(["optim.lr", "optim.epochs", "lada.memory_size", "lada.distill_weight", "optim.batch_size", "train.seed"]),
              numbers.map(repr)).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(st.sampled_from(NAMES), point_values).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(keys.map(str), point_values).map(lambda kv: f"{kv[0]}={kv[1]}"),
    texts,
)


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    import sweeps.runner

    def stop(*args: Any, **kwargs: Any) -> None:
        raise _WouldStartRay

    monkeypatch.setattr(sweeps.runner, "connect_ray", stop)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@SLOWER
@given(
    sets=st.lists(set_items, max_size=3),
    metric=st.one_of(st.none(), mixes, texts),
    point=st.one_of(st.none(), point_items),
    space=st.one_of(st.none(), st.sampled_from(REGISTRY), texts),
)
@example(sets=["optim.lr=fast"], metric=None, point=None, space=None)
@example(sets=["lada.memory_sise=8"], metric=None, point=None, space=None)
@example(sets=["data.shots=4"], metric="last=1,average=1", point="optim.lr=1e8", space="lada_smoke")
@example(sets=[], metric=None, point=None, space="lada_nope")
def test_lada_sweep_inputs_are_accepted_or_one_line(no_ray: Path, capsys: pytest.CaptureFixture[str], sets: list[str], metric: str | None,
                                                    point: str | None, space: str | None) -> None:
    """Random ``--set``/``--metric``/``--point``/``--space`` values: lada-sweep either gets as far
    as starting Ray (every input was valid), or exits with 2 and exactly one ``lada-sweep: error:``
    line on stderr - never a traceback."""
    from sweeps.cli import main

    # one folder per example (the fixture's folder is shared by all of them): an accepted example may
    # have written its sweep folder before the stand-in for Ray stopped it
    here = Path(tempfile.mkdtemp(dir=no_ray))
    argv = ["--storage", str(here / "results"), "--name", "p", "--mlflow-uri", f"sqlite:///{here / 'mlflow.db'}",
            "--set=data.cache_root=" + str(no_ray / "cache"), "--set=train.device=cpu", "--set=data.device=cpu"]
    argv += [f"--set={item}" for item in sets]
    if metric is not None:
        argv.append(f"--metric={metric}")
    if point is not None:
        argv.append(f"--point={point}")
    if space is not None:
        argv.append(f"--space={space}")
    try:
        code = main(argv)
    except _WouldStartRay:
        event("accepted: lada-sweep would start Ray")
        return
    except SystemExit as exc:  # argparse itself (e.g. an argument it cannot read): its usage + one line
        code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        return
    err = capsys.readouterr().err
    event("rejected in one line")
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("lada-sweep: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    _one_line(Exception(lines[0][len("lada-sweep: error: "):]))
    assert not (here / "results" / "p").exists(), "nothing written for bad input"

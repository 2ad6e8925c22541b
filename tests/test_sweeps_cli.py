"""Bad input to ``lada-sweep``: a clear one-line message and a non-zero exit before any trial starts."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from sweeps_helpers import SweepDirs, free_port, run_sweep, sweep_args

from sweeps import runner as runner_module
from sweeps.cli import main


@pytest.fixture
def dirs(tmp_path: Path) -> SweepDirs:
    return SweepDirs(tmp_path, tmp_path / "cache")


def _bad(dirs: SweepDirs, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    import ray

    code = main(sweep_args(dirs, "bad", *extra))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("lada-sweep: error:")]
    assert len(lines) == 1, err
    assert not ray.is_initialized(), "no Ray was started"
    assert not dirs.storage.exists() or not any(dirs.storage.iterdir()), "nothing was written"
    return lines[0]


def test_unknown_space(dirs: SweepDirs, capsys: pytest.CaptureFixture[str]) -> None:
    msg = _bad(dirs, capsys, "--space", "lada_nope")
    assert "lada_nope" in msg and "lada_full" in msg and "lada_smoke" in msg


def test_unknown_benchmark(dirs: SweepDirs, capsys: pytest.CaptureFixture[str]) -> None:
    msg = _bad(dirs, capsys, "--space", "lada_smoke", "--benchmark", "imagenet-tail")
    assert "imagenet-tail" in msg and "mini-tail" in msg


@pytest.mark.parametrize("metric", ["accuracy", "last=x", "last=0"])
def test_unknown_metric(dirs: SweepDirs, capsys: pytest.CaptureFixture[str], metric: str) -> None:
    msg = _bad(dirs, capsys, "--metric", metric)
    assert "metric" in msg


@pytest.mark.parametrize("item,words", [
    ("lada.memory_sise=8", ["lada.memory_sise"]),
    ("optim.lr=fast", ["optim.lr", "number"]),
    ("lada.memory_size=0", ["lada.memory_size"]),
    ("no_equals_sign", ["key=value"]),
])
def test_invalid_set(dirs: SweepDirs, capsys: pytest.CaptureFixture[str], item: str, words: list[str]) -> None:
    msg = _bad(dirs, capsys, "--set", item)
    for w in words:
        assert w in msg


@pytest.mark.parametrize("item", ["eval.split=test", "eval.peek_test=true"])
def test_a_sweep_cannot_be_told_to_tune_on_test(dirs: SweepDirs, capsys: pytest.CaptureFixture[str], item: str) -> None:
    msg = _bad(dirs, capsys, "--set", item)
    assert "validation split" in msg and "--peek-test" in msg


def test_unreachable_address(dirs: SweepDirs, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    msg = _bad(dirs, capsys, "--address", f"127.0.0.1:{port}")
    assert f"127.0.0.1:{port}" in msg and "no Ray cluster" in msg
    msg = _bad(dirs, capsys, "--address", "not-an-address")
    assert "host:port" in msg


def test_pretrained_weights_that_cannot_be_had(dirs: SweepDirs, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline with an empty weights cache: one line, exit 2, before Ray starts (it used to come after)."""
    from huggingface_hub import constants

    from lada_core import backbone

    monkeypatch.setattr(backbone, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(dirs.root / "hub"))
    started: list[object] = []
    monkeypatch.setattr(runner_module, "connect_ray", lambda *a: started.append(a))
    msg = _bad(dirs, capsys, "--space", "lada_smoke", "--set", "backbone.model=ViT-B-16", "--set", "backbone.pretrained=openai")
    assert "could not fetch pretrained weights ViT-B-16/openai" in msg and "backbone.pretrained=/path/to/ckpt.pt" in msg
    assert not started, "Ray was started before the weights were checked"


def test_bad_resources_and_names(dirs: SweepDirs, capsys: pytest.CaptureFixture[str]) -> None:
    assert "whole number" in _bad(dirs, capsys, "--gpus-per-trial", "1.5")
    assert "cpus-per-trial" in _bad(dirs, capsys, "--cpus-per-trial", "0")
    assert "num-samples" in _bad(dirs, capsys, "--num-samples", "0")
    assert "no sweep" in _bad(dirs, capsys, "--resume")


def test_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--space", "--benchmark", "--data-root", "--num-samples", "--metric", "--scheduler", "--gpus-per-trial",
                 "--cpus-per-trial", "--max-concurrent", "--address", "--storage", "--mlflow-uri", "--name", "--resume", "--seed"):
        assert flag in out
    flat = " ".join(out.split())  # argparse wraps lines
    assert "default: None" not in flat and "(default: False)" not in flat, "no default to state: say nothing"
    assert "(default: 0)" in flat and "(default: 2)" in flat, "--max-concurrent and --max-failures state theirs"
    assert not re.search(r"default[^()]*\)\s*\(default", flat), "each default said once per flag"


@pytest.mark.e2e
def test_resource_request_no_node_can_satisfy(dirs: SweepDirs) -> None:
    """A real local Ray with 1 CPU: a 4-CPU trial is an error before the sweep starts, not a trial
    pending forever."""
    res = run_sweep(dirs, sweep_args(dirs, "toobig", "--space", "lada_smoke", "--tiny-model", "--cpus-per-trial", "4", local_cpus=1), timeout=240)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "no node can run a trial that needs 4 CPU, 0 GPU" in res.stderr
    assert "1 CPU, 0 GPU" in res.stderr
    assert not (dirs.storage / "toobig" / "sweep.json").exists()
    assert not os.path.exists(dirs.cache_root), "failed before the feature cache was built"

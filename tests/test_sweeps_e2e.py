"""End to end, CPU only, real components: ``lada-sweep`` processes on a local Ray (a two-node
cluster of real ``ray start`` processes: tests/test_faults.py, node loss), a sqlite MLflow store and an Optuna storage, read back
through their own clients. Every sweep has a time budget. Layer ``e2e``, but for the driver kill
(``fault``: one of the real kills, with tests/test_faults.py)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sweeps_helpers import (
    SweepDirs,
    child_runs,
    kill_group,
    run_sweep,
    settings,
    study_states,
    summary,
    sweep_args,
    sweep_env,
    tune_trial_results,
)
from xtail_fixture import make_xtail_tree, remove_test_images

from lada_core import metrics as M
from sweeps.trainable import REPLAYED, TASK_SECONDS

BUDGET = ["--time-budget-s", "400"]


@pytest.fixture
def dirs(sweep_dirs: SweepDirs) -> SweepDirs:
    return sweep_dirs


def _mlflow_checks(dirs: SweepDirs, name: str, expect_finished: int, peek: bool = False) -> list:
    from mlflow.tracking import MlflowClient

    st = settings(dirs, name)
    num_tasks = st["num_tasks"]
    client = MlflowClient(dirs.mlflow_uri)
    runs = [r for r in child_runs(dirs.mlflow_uri, st["parent_run_id"]) if r.info.status == "FINISHED"]
    assert len(runs) == expect_finished
    ids = [r.data.tags["lada.trial_id"] for r in runs]
    assert len(set(ids)) == len(ids), "one child run per trial"
    for r in runs:
        done = int(r.data.tags["lada.tasks_done"])
        for key in ("val/average", "val/last", "val/transfer", "objective", f"val/acc/{st['dataset_names'][0]}"):
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert steps == list(range(done)), (key, steps)  # step = task index
        # Honest tuning: every metric of a trial run is a validation one (or bookkeeping), none a test one.
        logged = set(r.data.metrics)
        assert any(k.startswith("test/") for k in logged) == peek and not logged & {*M.METRICS, M.SEEN_MEAN}, logged
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"accuracy_matrix.csv", "accuracy_matrix.png", "config.yaml", "checkpoint"} <= arts, arts
        ckpt = {a.path for a in client.list_artifacts(r.info.run_id, "checkpoint")}
        assert f"checkpoint/task-{done - 1:03d}" in ckpt
        csv = Path(client.download_artifacts(r.info.run_id, "accuracy_matrix.csv")).read_text().splitlines()
        assert len(csv) == done + 1 and csv[0] == "step," + ",".join(st["dataset_names"])
        assert num_tasks == len(st["dataset_names"])
    return runs


@pytest.mark.e2e
@pytest.mark.mini_clip
def test_smoke_sweep_end_to_end(dirs: SweepDirs, tmp_path: Path) -> None:
    """lada_smoke on mini-tail, local Ray: trials, one MLflow child run per trial under the parent,
    one metric point per task step, the matrix artifacts, the best config exported. Fashion-MNIST is
    given without its test file (t10k): tuning never opens it."""
    from mlflow.tracking import MlflowClient

    from lada_core.benchmarks.mini_tail import FASHION_DIR
    from lada_core.config import build_config

    fashion = tmp_path / "fashion-mnist"
    fashion.mkdir()
    for f in Path(FASHION_DIR).glob("train-*"):
        shutil.copy(f, fashion / f.name)
    args = sweep_args(dirs, "smoke", "--space", "lada_smoke", "--seed", "0", "--data-root", str(fashion), *BUDGET)
    i = args.index("--verbose")
    del args[i : i + 2]  # the default console
    res = run_sweep(dirs, args)
    assert res.returncode == 0, res.stderr[-5000:]
    assert "Ray+MLflow overhead" in res.stdout
    _console_checks(dirs, res, "smoke", trials=4)
    s = summary(dirs, "smoke")
    assert s["trials"] == 4 and s["completed"] == 4
    st = settings(dirs, "smoke")
    assert st["num_tasks"] == 7
    assert study_states(st["study_storage"], "smoke") == {"COMPLETE": 4}
    import optuna

    study = optuna.load_study(study_name="smoke", storage=st["study_storage"])
    assert study.trials[0].params == {"lada.memory_size": 16, "lada.distill_weight": 64.0, "lada.gaussian_components": 4}, "paper defaults first"

    runs = _mlflow_checks(dirs, "smoke", expect_finished=4)
    client = MlflowClient(dirs.mlflow_uri)
    parent = client.get_run(st["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["lada.space"] == "lada_smoke" and parent.data.tags["lada.benchmark"] == "mini-tail"
    assert parent.data.tags["lada.cache_key"] == st["cache_key"]
    assert len(parent.data.tags.get("mlflow.source.git.commit", "")) == 40
    assert "best_val_average" in parent.data.metrics
    assert "validation data only" in parent.data.tags["lada.selection"] and "validation data only" in res.stdout
    assert "best_config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {r.data.params["lada.gaussian_components"] for r in runs} and all("lada.memory_size" in r.data.params for r in runs)

    best_yaml = dirs.folder("smoke") / "best_config.yaml"
    cfg = build_config(config_path=best_yaml)  # ready for lada-train --config
    best = s["best"]
    assert cfg.lada.distill_weight == pytest.approx(best["config"]["lada.distill_weight"]) and cfg.lada.memory_size == best["config"]["lada.memory_size"]
    assert cfg.backbone.model == "lada-mini" and cfg.backbone.pretrained == "lada-offline" and cfg.data.benchmark == "mini-tail"
    assert best["objective"] == pytest.approx(max(r["objective"] for r in s["rows"]))

    # The report reads the same sweep.
    rep = subprocess.run([sys.executable, "-m", "sweeps.report", "--storage", str(dirs.storage), "--name", "smoke", "--json"],
                         capture_output=True, text=True, cwd=dirs.root, timeout=120)
    assert rep.returncode == 0, rep.stderr
    data = json.loads(rep.stdout)
    assert data["states"] == {"COMPLETE": 4} and len(data["top"]) == 4
    assert data["top"][0]["value"] == pytest.approx(best["objective"])
    assert set(data["importances"]) == {"lada.memory_size", "lada.distill_weight", "lada.gaussian_components"}
    _parent_views_checks(dirs, st, s)


def _console_checks(dirs: SweepDirs, res: subprocess.CompletedProcess, name: str, trials: int) -> None:
    """The default console: a header, the progress, one line per finished trial, the summary; Ray's
    tables, worker lines and per-epoch lines in the log file and Ray's session folder instead."""
    lines = (res.stdout + res.stderr).splitlines()
    assert len(lines) < 60, "\n".join(lines)
    assert sum(1 for line in lines if line.startswith("trial ") and " completed " in line) == trials
    assert not any("epoch" in line or "Trial status" in line or "pid=" in line or "Token authentication" in line for line in lines), lines
    log = dirs.folder(name) / "lada-sweep.log"
    assert f"log     {log}" in res.stderr and log.stat().st_size > 0
    st = settings(dirs, name)
    url = [line for line in lines if line.startswith("parent run: http://127.0.0.1:5000/#/experiments/")]
    assert len(url) == 1 and f"/runs/{st['parent_run_id']}" in url[0]
    assert any(line.startswith("trials ") and f"{trials}/{trials} done" in line for line in lines)


def _parent_views_checks(dirs: SweepDirs, st: dict, s: dict) -> None:
    """The experiment opens on its runs table; the parent run has its description and plots; the
    report's HTML page holds the same tables and the plots."""
    from html.parser import HTMLParser

    from mlflow.tracking import MlflowClient

    client = MlflowClient(dirs.mlflow_uri)
    parent = client.get_run(st["parent_run_id"])
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    note = parent.data.tags["mlflow.note.content"]
    assert "### Leaderboard" in note and f"| 1 | {s['best']['trial_id']} | completed |" in note
    assert "lada.distill_weight" in note.split("### Parameter importances")[1] and "lada-train --config" in note
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {f"plots/{p}.png" for p in ("optimization_history", "param_importances", "parallel_coordinate", "best_trial_accuracy_matrix")}
    page = dirs.root / "smoke.html"
    rep = subprocess.run([sys.executable, "-m", "sweeps.report", "--storage", str(dirs.storage), "--name", "smoke", "--html", str(page)],
                         capture_output=True, text=True, cwd=dirs.root, timeout=300)
    assert rep.returncode == 0, rep.stderr

    class Page(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: list[tuple[str, dict]] = []
            self.cells: list[str] = []
            self._in_td = False

        def handle_starttag(self, tag: str, attrs: list) -> None:
            self.tags.append((tag, dict(attrs)))
            self._in_td = tag == "td"

        def handle_data(self, data: str) -> None:
            if self._in_td:
                self.cells.append(data)

    parsed = Page()
    parsed.feed(page.read_text())
    divs = {a.get("id") for t, a in parsed.tags if t == "div"}
    assert {"plot-optimization_history", "plot-param_importances", "plot-parallel_coordinate", "plot-best_trial_accuracy_matrix"} <= divs
    assert not [a for t, a in parsed.tags if t == "script" and a.get("src")], "self-contained: no external script"
    assert sum(1 for t, _ in parsed.tags if t == "table") == 2 and s["best"]["trial_id"] in parsed.cells


@pytest.mark.e2e
def test_sweep_finishes_with_every_test_image_deleted(dirs: SweepDirs, tmp_path: Path) -> None:
    """The tuning phase never opens a test image (Cha & Cho, TMLR 2025): a sweep on an X-TAIL tree
    whose test images and MNIST t10k files are all deleted finishes; its trials are scored on the
    validation split and their MLflow runs hold val/... metrics at step = task index, no test metric."""
    root = make_xtail_tree(tmp_path / "xtail", 2, 10, 1, val_per_class=2)
    assert remove_test_images(root) == 7 * 2 + 10 + 2 + 2  # seven split files of 2 classes, EuroSAT's 10, Aircraft's, MNIST's t10k pair
    res = run_sweep(dirs, sweep_args(dirs, "notest", "--space", "lada_smoke", "--tiny-model", "--benchmark", "xtail", "--data-root", str(root),
                                     "--num-samples", "2", "--max-concurrent", "1", "--set", "data.shots=null", "--set", "optim.epochs=1",
                                     "--set", "optim.batch_size=8", *BUDGET))
    assert res.returncode == 0, res.stderr[-5000:]
    s = summary(dirs, "notest")
    assert s["completed"] == 2 and s["tuned_on"] == "val" and s["peek_test"] is False
    assert all(r["val/average"] is not None for r in s["rows"])
    runs = _mlflow_checks(dirs, "notest", expect_finished=2)
    assert all(len(r.data.metrics) > 0 for r in runs)
    # The sweep's cache holds the train and val splits only: no test split was encoded. (The cache
    # root is shared by the session's tests: read this sweep's bundle, not the root's folders.)
    from lada_core.features.cache import bundle_splits

    splits = bundle_splits(settings(dirs, "notest")["cache_path"])
    assert sorted(splits) == ["train", "val"]
    assert [json.loads((f / "manifest.json").read_text())["split"] for f in splits.values()] == list(splits)


@pytest.mark.e2e
def test_peek_test_adds_test_metrics_and_says_so(dirs: SweepDirs, tmp_path: Path) -> None:
    """--peek-test: the trial runs also hold test/... metrics at every step; the trials are still scored
    on val/... (the objective equals val/average), and the summary says in words that the best was
    selected with test data in view."""
    from mlflow.tracking import MlflowClient

    root = make_xtail_tree(tmp_path / "xtail", 2, 10, 1, val_per_class=2)
    res = run_sweep(dirs, sweep_args(dirs, "peek", "--space", "lada_smoke", "--tiny-model", "--benchmark", "xtail", "--data-root", str(root),
                                     "--num-samples", "1", "--peek-test", "--set", "data.shots=null", "--set", "optim.epochs=1",
                                     "--set", "optim.batch_size=8", *BUDGET))
    assert res.returncode == 0, res.stderr[-5000:]
    assert "selected with test data in view" in res.stdout
    s = summary(dirs, "peek")
    assert s["peek_test"] is True and "test data in view" in s["selection"]
    (row,) = s["rows"]
    assert row["objective"] == pytest.approx(row["val/average"]) and row["test/average"] is not None
    (run,) = _mlflow_checks(dirs, "peek", expect_finished=1, peek=True)
    client = MlflowClient(dirs.mlflow_uri)
    for key in ("test/average", "test/acc/MNIST"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(10)), key
    parent = client.get_run(settings(dirs, "peek")["parent_run_id"])
    assert "test data in view" in parent.data.tags["lada.selection"]


@pytest.mark.e2e
@pytest.mark.mini_clip
def test_asha_stops_weak_trials_between_tasks(dirs: SweepDirs) -> None:
    """One trial at a time, keep the best half at each rung: the later, weaker trials stop after a
    task and are told to Optuna as PRUNED; their MLflow runs say so and hold only the steps run."""
    res = run_sweep(dirs, sweep_args(dirs, "asha", "--space", "lada_smoke", "--scheduler", "asha", "--max-concurrent", "1",
                                     "--reduction-factor", "2", "--grace-period", "1", "--seed", "0", *BUDGET))
    assert res.returncode == 0, res.stderr[-5000:]
    s = summary(dirs, "asha")
    pruned = [r for r in s["rows"] if r["outcome"] == "pruned"]
    assert pruned, s["outcomes"]
    assert all(r["tasks_done"] < 7 for r in pruned)
    st = settings(dirs, "asha")
    states = study_states(st["study_storage"], "asha")
    assert states.get("PRUNED", 0) == len(pruned) and states.get("COMPLETE", 0) == s["completed"]
    runs = _mlflow_checks(dirs, "asha", expect_finished=4)
    outcomes = sorted(r.data.tags["lada.outcome"] for r in runs)
    assert outcomes.count("pruned") == len(pruned)


def _poll(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.fault
@pytest.mark.mini_clip
def test_resume_after_the_driver_is_killed(dirs: SweepDirs) -> None:
    """Kill the driver (and the local Ray it started) mid-sweep, then --resume: the sweep finishes
    with the requested trials; Optuna, Ray's results and MLflow agree; nothing ran or logged twice."""
    import optuna

    name = "resume"
    # One trial at a time, a few hundred optimizer steps per task (about a second per task), so that
    # the kill lands while a trial is between tasks.
    args = sweep_args(dirs, name, "--space", "lada_smoke", "--num-samples", "2", "--max-concurrent", "1", "--seed", "1",
                      "--set", "optim.epochs=8", "--set", "optim.batch_size=2", *BUDGET)
    env = sweep_env(dirs)
    log = open(dirs.root / "killed-driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sweeps.run", *args], cwd=dirs.root, env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        study_db = dirs.folder(name) / "optuna.db"

        at_kill: dict[str, int] = {}  # the trial caught mid-sweep -> its tasks Ray's results held then

        def one_done_one_running() -> bool:
            if not study_db.exists():
                return False
            study = optuna.load_study(study_name=name, storage=f"sqlite:///{study_db}")
            states = {t.user_attrs.get("ray_trial_id"): t.state.name for t in study.trials}
            if "COMPLETE" not in states.values():
                return False
            results = tune_trial_results(dirs.folder(name))
            # another trial has reported a task but not its last one
            at_kill.update({tid: len(rows) for tid, rows in results.items() if states.get(tid) == "RUNNING" and 1 <= len(rows) <= 5})
            return bool(at_kill)

        _poll(one_done_one_running, 300, "one finished trial and another one mid-sweep")
    finally:
        kill_group(proc, signal.SIGKILL)
        log.close()
    before = study_states(f"sqlite:///{study_db}", name)
    assert before.get("COMPLETE", 0) == 1

    res = run_sweep(dirs, [*args, "--resume"])  # the same command again, plus --resume
    assert res.returncode == 0, res.stderr[-6000:]
    s = summary(dirs, name)
    assert s["trials"] == 2 and s["completed"] == 2, s["outcomes"]
    st = settings(dirs, name)
    study = optuna.load_study(study_name=name, storage=st["study_storage"])
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 2
    assert len({t.user_attrs["ray_trial_id"] for t in finished}) == 2
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    results = tune_trial_results(dirs.folder(name))
    assert len(results) == 2
    for tid, rows in results.items():
        steps = [r[M.TASK_INDEX] for r in rows]
        assert steps == list(range(7)), (tid, steps)  # every task once: nothing reran
    # The trial caught mid-sweep was continued from its checkpoint, not trained again: the tasks it
    # had done are the killed driver's rows (Tune's saved state had them) or rows the new driver
    # replayed from the stored checkpoints without training (the saved state was older).
    ((tid, had),) = at_kill.items()
    new_pid = results[tid][-1]["pid"]
    kept = [r[M.TASK_INDEX] for r in results[tid] if r["pid"] != new_pid or r.get(REPLAYED) == 1]
    seen = [(r[M.TASK_INDEX], r["pid"], r.get(REPLAYED), r[TASK_SECONDS]) for r in results[tid]]
    assert kept == list(range(len(kept))) and len(kept) >= had, f"trained again after the kill (it had {had} tasks): {seen}"
    assert all(r[TASK_SECONDS] == 0 for r in results[tid] if r.get(REPLAYED) == 1)
    runs = _mlflow_checks(dirs, name, expect_finished=2)
    assert {r.data.tags["lada.trial_id"] for r in runs} == {t.user_attrs["ray_trial_id"] for t in finished}
    others = [r for r in child_runs(dirs.mlflow_uri, st["parent_run_id"]) if r.info.status != "FINISHED"]
    assert all(r.info.status == "KILLED" for r in others), "only runs of trials the killed driver never saved"


# -- data-parallel trials ------------------------------------------------------------------------------
def _dp_config(cache_root: Path):
    from lada_core.config import build_config
    from search_spaces import get_space

    base = dict(get_space("lada_smoke").base)
    base.update({"data.cache_root": str(cache_root), "train.device": "cpu", "data.device": "cpu", "optim.epochs": 2, "optim.batch_size": 4})
    return build_config(sample=base)


@pytest.mark.integration  # spawned ranks of one process, no command
def test_data_parallel_gloo_matches_one_process(tmp_path: Path, shared_cache_root: Path) -> None:
    """Two gloo ranks on CPU, each with half of every batch and gradients summed: the same accuracy
    matrix and the same learned state as one process, up to float tolerance."""
    import torch

    from lada_core.features import ensure_cache
    from sweeps.distributed import run_continual_parallel

    cfg = _dp_config(shared_cache_root)
    info = ensure_cache(cfg, progress=False, log=lambda m: None)
    one = run_continual_parallel(cfg, info.path, tmp_path / "one", 1, log=lambda m: None)
    two = run_continual_parallel(cfg, info.path, tmp_path / "two", 2, backend="gloo", log=lambda m: None)
    np.testing.assert_allclose(two.matrix, one.matrix, atol=0.05)  # at most a borderline test image
    a = torch.load(tmp_path / "one" / "task-006" / "state.pt", weights_only=False)
    b = torch.load(tmp_path / "two" / "task-006" / "state.pt", weights_only=False)
    for key in ("units", "text_seen"):
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-4)


@pytest.mark.e2e
def test_multi_gpu_trial_placement_with_logical_gpus(dirs: SweepDirs) -> None:
    """--gpus-per-trial 2 on a local Ray with two logical GPUs: the trial gets both, runs two
    data-parallel ranks (gloo here, NCCL on real GPUs) and ends with the one-process result."""
    from lada_core.features import load_bundle
    from lada_core.trainer import run_continual

    res = run_sweep(dirs, sweep_args(dirs, "dp", "--space", "lada_paper", "--tiny-model", "--local-gpus", "2", "--gpus-per-trial", "2",
                                     "--set", "data.shots=16", "--set", "data.views=2", "--set", "optim.epochs=1", "--set", "optim.batch_size=4",
                                     *BUDGET))
    assert res.returncode == 0, res.stderr[-6000:]
    s = summary(dirs, "dp")
    assert s["completed"] == 1
    rows = tune_trial_results(dirs.folder("dp"))
    (trial_rows,) = rows.values()
    assert {r["world_size"] for r in trial_rows} == {2}
    # The same config in one process, here.
    from lada_core.config import build_config
    from sweeps.trainable import TrialSpec

    st = settings(dirs, "dp")
    from sweeps.settings import Settings, base_config

    spec = TrialSpec(base_config=base_config(Settings(**st)).to_dict(), overrides=tuple(st["set"]))
    cfg = spec.config({})
    assert cfg == build_config(overrides=st["set"], base=base_config(Settings(**st)))
    bundle = load_bundle(st["cache_path"])  # the cache the sweep built
    ref = run_continual(cfg, bundle, dirs.root / "ref", log=lambda m: None)
    last = trial_rows[-1]
    assert cfg.eval.split == "val"  # the sweep's trials score the validation split
    for key in M.METRICS:
        assert last[f"val/{key}"] == pytest.approx(ref.summary[key], abs=0.05), key
    assert not math.isnan(last["objective"])

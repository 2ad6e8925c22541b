"""Faults a sweep survives, each on a real local Ray (CPU only), with real ``lada-sweep`` processes,
a sqlite MLflow store or a real ``mlflow server``, and an Optuna storage, read back through their own
clients. Every sweep has a time budget and a process timeout.

1. A trial's worker process SIGKILLed (from outside, while the fault seam ``trial.after_task`` holds
   it after its third task): retried from its last finished task's checkpoint, the same accuracy
   matrix as an uninterrupted run with the same seed, its MLflow run continued. (The same worker lost
   just after its last task: ``tests/test_integration.py``.)
2. A worker node of a two-node cluster killed mid-sweep: its trial moves to the other node, the
   sweep finishes with every requested trial.
3. A diverging trial (an absurd learning rate): failed within one step, the reason in its MLflow run,
   FAIL in Optuna; the other trials complete.
4. The MLflow tracking server down for the rest of the sweep: the sweep succeeds; ``--sync-mlflow``
   writes what is missing once the server is back, and a second sync writes nothing.
5. The results disk full mid-sweep (a tiny tmpfs, filled up) and a read-only results folder: one
   clear line naming the path, exit code 3, no traceback; finished trials intact; ``--resume`` after
   freeing space finishes the sweep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sweeps_helpers import (
    LocalRayCluster,
    MlflowServer,
    SweepDirs,
    child_runs,
    kill_group,
    run_sweep,
    settings,
    short_tmp,
    study_states,
    summary,
    sweep_args,
    sweep_env,
    tune_trial_results,
)

from lada_core import metrics as M
from sweeps.trainable import REPLAYED

pytestmark = pytest.mark.fault

# lada_smoke on the small random-init model: what these tests check (every task trained once, every step
# read once, the outcome of each trial, the messages) does not depend on what is learned, and they need
# not wait for the mini CLIP's one-time pretraining (the demo, ``test_sweeps_e2e``, runs on it)
SMOKE = ["--space", "lada_smoke", "--tiny-model"]

BUDGET = ["--time-budget-s", "300"]


def _hold_after_task(dirs: SweepDirs, task: int, once: bool = True) -> tuple[dict[str, str], Path, Path]:
    """The fault seam ``trial.after_task`` armed to hold a trial's worker right after it reported
    ``task`` (the first worker to get there, or every one when not ``once``), until the test creates
    the returned release file; the returned marker holds the held worker's pid (``once``). The test
    acts at a known point (kills the worker, its node, a server), however fast or slow the machine."""
    release, marker = dirs.root / "release", dirs.root / "held"
    entry: dict[str, Any] = {"task": task, "until": str(release)}
    if once:
        entry["once"] = str(marker)
    return _fault_env(dirs, {"trial.after_task": entry}), release, marker


@pytest.fixture
def dirs(sweep_dirs: SweepDirs) -> SweepDirs:
    return sweep_dirs


def _start(dirs: SweepDirs, args: list[str], env: dict[str, str] | None = None, log: str = "sweep") -> subprocess.Popen:
    """``python -m sweeps.run ARGS`` in the background, in its own process group; its stderr file is
    kept on the process (``err_path``) so that a failure can show it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sweeps.run", *args], cwd=dirs.root, env=env or sweep_env(dirs),
        stdout=open(dirs.root / f"{log}.out", "w"), stderr=open(dirs.root / f"{log}.err", "w"), start_new_session=True,
    )
    proc.err_path = dirs.root / f"{log}.err"  # type: ignore[attr-defined]
    return proc


def _wait(proc: subprocess.Popen, dirs: SweepDirs, timeout: float, log: str = "sweep") -> tuple[int, str, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"sweep timed out:\n{(dirs.root / f'{log}.err').read_text()[-5000:]}") from None
    finally:
        kill_group(proc, wait=0)
    return proc.returncode, (dirs.root / f"{log}.out").read_text(), (dirs.root / f"{log}.err").read_text()


def _poll(predicate: Any, timeout: float, what: str, proc: subprocess.Popen | None = None) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            err = getattr(proc, "err_path", None)
            tail = err.read_text(errors="replace")[-5000:] if err is not None and err.exists() else ""
            raise AssertionError(f"the sweep ended (exit {proc.returncode}) before {what}:\n{tail}")
        try:
            value = predicate()
        except Exception:  # files half written, a study not created yet, sqlite busy
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _steps(rows: list[dict[str, Any]]) -> list[int]:
    return [r[M.TASK_INDEX] for r in rows if M.TASK_INDEX in r and not r.get("storage_error")]


def _trained(rows: list[dict[str, Any]]) -> list[int]:
    """The steps a trial trained (Ray's results less the replayed reports, which train nothing)."""
    return [r[M.TASK_INDEX] for r in rows if M.TASK_INDEX in r and not r.get("storage_error") and not r.get(REPLAYED)]


def _read_once(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Each trial's steps as the project's results reader gives them (Ray's ``result.json`` is
    at-least-once; the reader keeps each step's first report)."""
    from sweeps.results import read_results

    return {tid: rec.steps for tid, rec in read_results(folder).items()}


def _one_run_per_trial(dirs: SweepDirs, name: str, uri: str | None = None, folder: Path | None = None) -> dict[str, Any]:
    """The sweep's child runs by trial id, checked: one run per trial, each task step logged once."""
    from mlflow.tracking import MlflowClient

    uri = uri or dirs.mlflow_uri
    st = json.loads(((folder or dirs.folder(name)) / "sweep.json").read_text())
    client = MlflowClient(uri)
    runs = child_runs(uri, st["parent_run_id"])
    ids = [r.data.tags["lada.trial_id"] for r in runs]
    assert len(ids) == len(set(ids)), f"a trial has two runs: {ids}"
    out = {}
    for r in runs:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, M.TASK_INDEX)]
        assert steps == sorted(set(steps)), f"a step logged twice: {steps}"
        out[r.data.tags["lada.trial_id"]] = (r, steps)
    return out


# -- 1. a trial's worker process killed mid-task ---------------------------------------------------------
REFERENCE = textwrap.dedent("""
    import json, sys
    from lada_core.features import load_bundle
    from lada_core.trainer import run_continual
    from sweeps.settings import Settings, base_config
    from sweeps.trainable import TrialSpec
    st, config, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    spec = TrialSpec(base_config=base_config(Settings(**st)).to_dict(), overrides=tuple(st["set"]))
    res = run_continual(spec.config(config), load_bundle(st["cache_path"]), out, log=lambda m: None)
    print(json.dumps(res.matrix.tolist()))
""")


def _reference_matrix(dirs: SweepDirs, name: str, config: dict[str, Any]) -> list[list[float]]:
    """The same trial, uninterrupted, in a fresh process with one thread (as Ray runs a 1-CPU trial)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", REFERENCE, json.dumps(settings(dirs, name)), json.dumps(config), str(dirs.root / "ref")],
                         capture_output=True, text=True, env=env, cwd=dirs.root, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_killed_worker_is_retried_from_its_last_task(dirs: SweepDirs) -> None:
    name = "killed"
    env, release, marker = _hold_after_task(dirs, task=2)
    proc = _start(dirs, sweep_args(dirs, name, *SMOKE, "--num-samples", "1", "--seed", "3", *BUDGET), env=sweep_env(dirs, env))
    folder = dirs.folder(name)

    def held_and_recorded() -> tuple[str, int] | None:
        # The worker is held after task 2 and the driver has taken its three results.
        if not marker.exists() or not marker.read_text():
            return None
        for tid, rows in tune_trial_results(folder).items():
            if len(rows) == 3:
                return tid, int(marker.read_text())
        return None

    try:
        tid, pid = _poll(held_and_recorded, 240, "the worker held after its third task", proc)
        os.kill(pid, signal.SIGKILL)
        release.touch()
        code, out, err = _wait(proc, dirs, 400)
    finally:
        kill_group(proc, wait=0)
    assert code == 0, err[-5000:]
    assert [e["task"] for e in _fired(dirs, "trial.after_task")] == [2], "the seam held the worker once, after task 2"
    s = summary(dirs, name)
    assert s["trials"] == 1 and s["completed"] == 1, s["outcomes"]
    raw = tune_trial_results(folder)[tid]
    assert _trained(raw) == list(range(7)), "every task trained once: the retry resumed after the last finished one"
    rows = _read_once(folder)[tid]
    assert _steps(rows) == list(range(7)), "every task once in the reader"
    pids = [r["pid"] for r in rows]
    assert pids[:3] == [pid] * 3 and pid not in pids[3:], ("tasks 0-2 in the killed worker, the rest in a new one", pids)

    names = settings(dirs, name)["dataset_names"]
    matrix = [[r[f"val/acc/{n}"] for n in names] for r in rows]
    reference = _reference_matrix(dirs, name, rows[-1]["config"])
    np.testing.assert_allclose(matrix, reference, atol=1e-9, err_msg="the same matrix as an uninterrupted run with the same seed")

    runs = _one_run_per_trial(dirs, name)
    assert list(runs) == [tid]
    run, steps = runs[tid]
    assert run.info.status == "FINISHED" and run.data.tags["lada.outcome"] == "completed"
    assert steps == list(range(7)), "the run was continued after the retry, every step once"


# -- 2. a worker node of a two-node cluster killed --------------------------------------------------------
def test_lost_worker_node_trials_move_to_the_other_node(dirs: SweepDirs) -> None:
    """A head and a worker node from real ``ray start`` processes (token-authenticated), one CPU each:
    the sweep connects with ``--address``, its concurrent trials run on both nodes (the kill waits for
    that), then the worker node is killed and its trial moves to the head."""
    name = "nodeloss"
    tmp = short_tmp("rc")
    cluster = LocalRayCluster(tmp)
    hold, release, _ = _hold_after_task(dirs, task=2, once=False)
    cluster.env.update(hold)  # the nodes' workers are the ray start processes' children: the plan goes there
    try:
        cluster.start_head(num_cpus=1, resources={"node_a": 1})
        cluster.add_node(num_cpus=1, resources={"node_b": 1})
        cluster.wait_nodes(2)
        env = sweep_env(dirs, {k: cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")})
        # Every trial's worker is held after task 2 until the release: the kill lands while both
        # nodes hold a trial with tasks to go (one CPU per node: two held trials are on two nodes).
        args = sweep_args(dirs, name, *SMOKE, "--address", cluster.address, "--num-samples", "3",
                          "--max-concurrent", "2", "--cpus-per-trial", "1", *BUDGET, local_cpus=None)
        proc = _start(dirs, args, env=env)
        try:
            _poll(lambda: len(_fired(dirs, "trial.after_task")) == 2, 240, "a trial held on each node", proc)
            os.killpg(cluster.procs[1].pid, signal.SIGKILL)  # the worker node: its raylet and its workers
            release.touch()
            code, out, err = _wait(proc, dirs, 400)
        finally:
            kill_group(proc, wait=0)
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    assert code == 0, err[-5000:]
    s = summary(dirs, name)
    assert s["trials"] == 3 and s["completed"] == 3, s["outcomes"]
    raw = tune_trial_results(dirs.folder(name))
    assert len(raw) == 3
    for tid, rows in raw.items():
        assert _trained(rows) == list(range(7)), (tid, "every task trained once: a moved trial resumed from its checkpoint")
    results = _read_once(dirs.folder(name))
    assert all(_steps(rows) == list(range(7)) for rows in results.values()), "every task once in the reader"
    held = _fired(dirs, "trial.after_task")
    assert len(held) >= 2 and all(e["task"] == 2 for e in held), held
    moved = {tid: [r["node_id"] for r in rows] for tid, rows in results.items() if len({r["node_id"] for r in rows}) == 2}
    assert moved, "a trial of the lost node was rescheduled on the other one"
    (lost, survivor), *others = {(nodes[0], nodes[-1]) for nodes in moved.values()}
    assert not others and lost != survivor, moved
    for nodes in moved.values():  # the lost node's tasks, then the survivor's: never back
        assert nodes == sorted(nodes, key=lambda n: n == survivor), nodes
    runs = _one_run_per_trial(dirs, name)
    assert set(runs) == set(results)
    assert all(run.info.status == "FINISHED" and steps == list(range(7)) for run, steps in runs.values())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(dirs.mlflow_uri)
    for run, _ in runs.values():
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/task-006"]


# -- 3. a diverging trial --------------------------------------------------------------------------------
def test_diverging_trial_fails_and_the_sweep_goes_on(dirs: SweepDirs) -> None:
    name = "diverge"
    res = run_sweep(dirs, sweep_args(dirs, name, *SMOKE, "--num-samples", "3", "--point", "lada.distill_weight=1e300", *BUDGET))
    assert res.returncode == 0, res.stderr[-5000:]
    s = summary(dirs, name)
    assert s["outcomes"] == {"completed": 2, "diverged": 1}, s["outcomes"]
    st = settings(dirs, name)
    assert study_states(st["study_storage"], name) == {"COMPLETE": 2, "FAIL": 1}
    import optuna

    study = optuna.load_study(study_name=name, storage=st["study_storage"])
    (failed,) = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed.params["lada.distill_weight"] == 1e300 and "diverged" in failed.user_attrs["error"]
    runs = _one_run_per_trial(dirs, name)
    diverged = [r for r, _ in runs.values() if r.data.tags.get("lada.outcome") == "diverged"]
    assert len(diverged) == 1
    run = diverged[0]
    assert run.info.status == "FAILED" and float(run.data.params["lada.distill_weight"]) == 1e300
    reason = run.data.tags["lada.error"]
    # Detected at the step whose loss is not finite: replay starts at task 2, and a replayed feature's
    # weight gamma * pi is infinite in float32 at its first step.
    assert "training diverged" in reason and "task 2/7" in reason and "epoch 1, step 1 " in reason, reason
    others = [r for r, steps in runs.values() if r is not run]
    assert all(r.info.status == "FINISHED" and r.data.tags["lada.outcome"] == "completed" for r in others)


# -- 4. the MLflow tracking server unreachable ---------------------------------------------------------
def test_mlflow_server_down_then_sync(dirs: SweepDirs) -> None:
    name = "mlflowdown"
    server = MlflowServer(dirs.root / "mlflow-server")
    server.start()
    try:
        args = sweep_args(dirs, name, *SMOKE, "--num-samples", "2", "--max-concurrent", "1", *BUDGET)
        args[args.index("--mlflow-uri") + 1] = server.uri
        hold, release, marker = _hold_after_task(dirs, task=1)
        proc = _start(dirs, args, env=sweep_env(dirs, hold))
        folder = dirs.folder(name)
        try:
            # The parent run exists and the first trial, held after task 1, has reported two tasks:
            # stop the server, then let the sweep go on.
            _poll(lambda: marker.exists() and settings(dirs, name).get("parent_run_id")
                  and any(len(r) >= 2 for r in tune_trial_results(folder).values()), 240, "the first task steps", proc)
            server.stop()
            release.touch()
            code, out, err = _wait(proc, dirs, 400)
        finally:
            kill_group(proc, wait=0)
        assert code == 0, err[-5000:]
        assert len(_fired(dirs, "trial.after_task")) == 1, "the seam held the first trial while the server went down"
        assert "Traceback" not in err, err[-5000:]
        assert "--sync-mlflow" in out, "the sweep says how to catch MLflow up"
        s = summary(dirs, name)
        assert s["completed"] == 2, "Ray's results are the source of truth"

        server.start()
        report = [sys.executable, "-m", "sweeps.report", "--storage", str(dirs.storage), "--name", name, "--sync-mlflow", "--json"]
        first = subprocess.run(report, capture_output=True, text=True, cwd=dirs.root, timeout=300)
        assert first.returncode == 0, first.stderr[-3000:]
        counts = json.loads(first.stdout.strip().splitlines()[-1])
        assert counts["metrics_logged"] > 0 and counts["runs_closed"] == 2 and counts["parent_closed"] == 1, counts
        second = subprocess.run(report, capture_output=True, text=True, cwd=dirs.root, timeout=300)
        assert second.returncode == 0, second.stderr[-3000:]
        again = json.loads(second.stdout.strip().splitlines()[-1])
        assert again == {"runs_created": 0, "metrics_logged": 0, "runs_closed": 0, "parent_closed": 0, "duplicate_runs": 0}, again

        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.uri)
        runs = _one_run_per_trial(dirs, name, uri=server.uri)
        assert set(runs) == set(tune_trial_results(folder)), "one run per trial of Ray's results"
        for run, steps in runs.values():
            assert run.info.status == "FINISHED" and run.data.tags["lada.outcome"] == "completed"
            assert steps == list(range(7))
            assert [m.step for m in client.get_metric_history(run.info.run_id, "val/" + M.AVERAGE)] == list(range(7))
            arts = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"accuracy_matrix.csv", "accuracy_matrix.png", "config.yaml", "checkpoint"} <= arts, arts
        parent = client.get_run(settings(dirs, name)["parent_run_id"])
        assert parent.info.status == "FINISHED" and parent.data.metrics["trials_completed"] == 2
        assert "best_val_average" in parent.data.metrics
    finally:
        server.stop()


# -- 5. a full or read-only results folder ---------------------------------------------------------------
INJECT = textwrap.dedent('''
    # Test hook (tests/test_faults.py), used only where no tmpfs can be mounted: writes that Ray makes
    # under LADA_TEST_ENOSPC_ROOT fail with ENOSPC once the flag file exists (a disk that fills up).
    import errno, os
    _flag, _root = os.environ.get("LADA_TEST_ENOSPC_FLAG"), os.environ.get("LADA_TEST_ENOSPC_ROOT")
    if _flag and _root:
        import pyarrow.fs as _fs
        _copy = _fs.copy_files
        def copy_files(source, destination, *args, **kwargs):
            if os.path.exists(_flag) and str(destination).startswith(_root):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(destination))
            return _copy(source, destination, *args, **kwargs)
        _fs.copy_files = copy_files
''')

def _enospc_env(folder: Path) -> dict[str, str]:
    """A disk that fills up where no tmpfs can be mounted: INJECT as a sitecustomize on PYTHONPATH
    (the driver's and Ray's workers' processes); it acts only when its variables are set."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(INJECT)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def _fault_env(dirs: SweepDirs, plan: dict[str, Any]) -> dict[str, str]:
    """The product's fault seams (sweeps.faults) armed with ``plan``; they log to ``dirs.root/faults.log``."""
    from sweeps import faults

    return {faults.PLAN_ENV: json.dumps(plan), faults.LOG_ENV: str(dirs.root / "faults.log")}


def _fired(dirs: SweepDirs, point: str) -> list[dict[str, Any]]:
    from sweeps import faults

    return faults.fired(dirs.root / "faults.log", point)


@contextmanager
def _small_disk(path: Path, size: str = "64m") -> Iterator[tuple[Any, dict[str, str], bool]]:
    """A results disk that can be filled: a tmpfs when this process may mount one (root, CAP_SYS_ADMIN),
    else an injected ENOSPC in Ray's writes (a sitecustomize on PYTHONPATH). Yields ((fill, free),
    extra env for the sweep, whether a tmpfs is mounted)."""
    path.mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {}
    mounted = False
    if not os.environ.get("LADA_TEST_NO_MOUNT"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0
    filler = path / "filler.bin"
    if mounted:
        def fill() -> None:
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
                except OSError:
                    pass

        def free() -> None:
            filler.unlink(missing_ok=True)
    else:
        flag = path.parent / "disk-is-full"

        def fill() -> None:
            flag.touch()

        def free() -> None:
            flag.unlink(missing_ok=True)
        env.update(_enospc_env(path.parent / "test-hooks"), LADA_TEST_ENOSPC_FLAG=str(flag), LADA_TEST_ENOSPC_ROOT=str(path))
    try:
        yield (fill, free), env, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lada-sweep: error:")]
    assert len(lines) == 1, err[-5000:]
    assert "Traceback" not in err, err[-5000:]
    return lines[0]


def test_disk_full_stops_the_sweep_cleanly_and_resume_finishes(dirs: SweepDirs) -> None:
    """The disk fills up after the first trial ends, and the first write to meet it is the Optuna
    study's (sqlite, when the next trial is asked for): the fault seam ``search.ask`` holds the
    driver's second ask until the disk is full. (A trial's or Ray's write meeting it first, and the
    restored sweep after it, is the integration test
    ``test_a_full_disk_stops_the_sweep_and_the_restored_sweep_finishes_it``.)"""
    import optuna
    import torch

    name = "diskfull"
    disk = dirs.root / "disk"
    with _small_disk(disk) as ((fill, free), extra, mounted):
        args = sweep_args(dirs, name, *SMOKE, "--num-samples", "2", "--max-concurrent", "1", *BUDGET)
        args[args.index("--storage") + 1] = str(disk / "results")
        folder = disk / "results" / name
        extra = {**extra, **_fault_env(dirs, {"search.ask": {"nth": 2, "until": str(dirs.root / "disk-filled")}})}
        env = sweep_env(dirs, extra)
        proc = _start(dirs, args, env=env)
        db = f"sqlite:///{folder / 'optuna.db'}"
        try:
            def first_complete() -> str | None:
                done = [t.user_attrs.get("ray_trial_id") for t in optuna.load_study(study_name=name, storage=db).trials
                        if t.state.name == "COMPLETE"]
                return done[0] if done else None

            finished = _poll(lambda: (folder / "optuna.db").exists() and first_complete(), 240, "a finished trial", proc)
            # A finished trial is written to storage when it ends, not at Tune's next snapshot.
            _poll(lambda: len(_steps(tune_trial_results(folder).get(finished, []))) == 7, 5, "the finished trial's results", proc)
            fill()  # the disk is full from now on
            (dirs.root / "disk-filled").touch()  # lets the held second ask go
            code, out, err = _wait(proc, dirs, 300)
        finally:
            kill_group(proc, wait=0)
        assert code == 3, err[-5000:]
        assert len(_fired(dirs, "search.ask")) == 1, "the seam held the second ask back"
        line = _one_error_line(err)
        assert "No space left on device" in line and str(disk) in line, line
        assert "--resume --name diskfull" in line, line
        assert "its 1 finished trial is kept" in line, line
        if mounted:  # (the injected ENOSPC reaches pyarrow's writes only)
            assert f"(sqlite: database or disk is full): {folder / 'optuna.db'}" in line, line

        # The finished trial is intact: its results, its last checkpoint, its study entry, its run.
        results = tune_trial_results(folder)
        assert _steps(results[finished]) == list(range(7))
        (trial_dir,) = folder.glob(f"*_{finished}_*")
        newest = max(trial_dir.glob("checkpoint_*/task-006/state.pt"))
        assert torch.load(newest, weights_only=False)["task_index"] == 6
        assert study_states(db, name).get("COMPLETE") == 1
        runs = _one_run_per_trial(dirs, name, folder=folder)
        assert runs[finished][0].info.status == "FINISHED" and runs[finished][1] == list(range(7))

        free()
        res = run_sweep(dirs, [*args, "--resume"], env=env)
        assert res.returncode == 0, res.stderr[-5000:]
        s = json.loads((folder / "summary.json").read_text())
        assert s["trials"] == 2 and s["completed"] == 2, s["outcomes"]
        # Every trial has all its steps. Tune's last snapshot before the disk filled may predate the
        # end of the finished trial: the resumed driver then sees it end once more and Ray's
        # result.json gets its final step again (MLflow and Optuna count it once). A trial that
        # started after that snapshot is unknown to the resumed driver: its folder and run stay as
        # they were (the run marked KILLED) and a new trial takes its place.
        trials = [r["trial_id"] for r in s["rows"]]
        results = tune_trial_results(folder)
        assert finished in trials and all(sorted(set(_steps(results[t]))) == list(range(7)) for t in trials)
        assert _steps(results[finished])[:7] == list(range(7))
        runs = _one_run_per_trial(dirs, name, folder=folder)
        assert all(runs[t][0].info.status == "FINISHED" and runs[t][1] == list(range(7)) for t in trials)
        assert all(run.info.status == "KILLED" for t, (run, _) in runs.items() if t not in trials)


def test_read_only_results_folder_is_one_clear_line(dirs: SweepDirs) -> None:
    ro = dirs.root / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode == 0:
        storage, reason = ro / "results", "Read-only file system"
    else:  # no mount here: a path under a file can never be a folder (root ignores permissions)
        (ro / "a-file").write_text("x")
        storage, reason = ro / "a-file" / "results", "Not a directory"
    try:
        args = sweep_args(dirs, "ro", *SMOKE, *BUDGET)
        args[args.index("--storage") + 1] = str(storage)
        res = run_sweep(dirs, args, timeout=240)
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)
    assert res.returncode == 3, res.stderr[-3000:]
    line = _one_error_line(res.stderr)
    assert reason in line and str(ro) in line, line
    assert "Started a local Ray" not in res.stderr, "it failed before Ray started"

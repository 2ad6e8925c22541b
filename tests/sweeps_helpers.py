"""Helpers of the sweep tests: run ``lada-sweep`` as a real process, a two-node local Ray cluster
made of real ``ray start`` processes, and MLflow/Optuna read-back."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_tmp(prefix: str) -> Path:
    """A short folder under /tmp (Ray's unix socket paths must stay under ~107 characters)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@dataclass
class SweepDirs:
    root: Path
    cache_root: Path
    ray_tmp: Path = field(default_factory=lambda: short_tmp("rt"))

    @property
    def storage(self) -> Path:
        return self.root / "results"

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def folder(self, name: str) -> Path:
        return self.storage / name


def sweep_env(dirs: SweepDirs, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RAY_TMPDIR=str(dirs.ray_tmp),
        RAY_DEDUP_LOGS="0",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
        TUNE_GLOBAL_CHECKPOINT_S="1",  # snapshot the experiment often (the resume test kills the driver)
    )
    env.update(extra or {})
    return env


def sweep_args(dirs: SweepDirs, name: str, *extra: str, local_cpus: int | None = 2) -> list[str]:
    args = [
        "--name", name,
        "--storage", str(dirs.storage),
        "--mlflow-uri", dirs.mlflow_uri,
        "--set", f"data.cache_root={dirs.cache_root}",
        "--set", "train.device=cpu",
        "--set", "data.device=cpu",
        "--verbose", "0",
    ]
    if local_cpus is not None:
        args += ["--local-cpus", str(local_cpus)]
    return args + list(extra)


def run_sweep(dirs: SweepDirs, args: list[str], timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m sweeps.run ARGS`` in its own process group (killed as a group on timeout)."""
    cmd = [sys.executable, "-m", "sweeps.run", *args]
    proc = subprocess.Popen(cmd, cwd=dirs.root, env=env or sweep_env(dirs), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"sweep timed out after {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-6000:]}") from None
    finally:
        kill_group(proc, sig=signal.SIGKILL, wait=0)  # leftovers of the driver's local Ray, if any
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, wait: float = 10) -> None:
    """Signal the process group this helper started (and only that one)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        return
    if wait:
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def summary(dirs: SweepDirs, name: str) -> dict[str, Any]:
    return json.loads((dirs.folder(name) / "summary.json").read_text())


def settings(dirs: SweepDirs, name: str) -> dict[str, Any]:
    return json.loads((dirs.folder(name) / "sweep.json").read_text())


def child_runs(tracking_uri: str, parent_run_id: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=1000)


def study_states(storage_url: str, name: str) -> dict[str, int]:
    import optuna

    study = optuna.load_study(study_name=name, storage=storage_url)
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def tune_trial_results(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Every result line of every trial folder, by trial id."""
    out: dict[str, list[dict[str, Any]]] = {}
    for f in sorted(folder.glob("*/result.json")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            out.setdefault(rows[0]["trial_id"], []).extend(rows)
    return out


class LocalRayCluster:
    """A multi-node Ray cluster on this machine from real ``ray start --block`` processes (one per
    node, each with its own resources), token-authenticated, torn down by process group."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.token = tmp / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        self.env = dict(os.environ)
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token), RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(tmp))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, args: list[str], log: str) -> subprocess.Popen:
        cmd = [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
               "--object-store-memory=100000000", *args]
        proc = subprocess.Popen(cmd, env=self.env, stdout=open(self.tmp / log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_head(self, num_cpus: int, resources: dict[str, float] | None = None) -> None:
        self._start([
            "--head", f"--port={self.port}", f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={self.tmp}",
            "--include-dashboard=false", f"--resources={json.dumps(resources or {})}",
        ], "head.log")
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"ray head did not start: {(self.tmp / 'head.log').read_text()[-2000:]}")

    def add_node(self, num_cpus: int, resources: dict[str, float] | None = None) -> None:
        i = len(self.procs)
        self._start([
            f"--address={self.address}", f"--num-cpus={num_cpus}", "--num-gpus=0",
            f"--resources={json.dumps(resources or {})}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--min-worker-port={21000 + 1000 * i}", f"--max-worker-port={21999 + 1000 * i}",
        ], f"node{i}.log")

    def wait_nodes(self, n: int, timeout: float = 90) -> None:
        """Wait until ``n`` nodes are alive (checked from a short-lived subprocess driver)."""
        code = (
            "import ray, time, sys\n"
            f"ray.init(address='{self.address}', logging_level='ERROR')\n"
            f"deadline = time.time() + {timeout}\n"
            f"while len([x for x in ray.nodes() if x['Alive']]) < {n} and time.time() < deadline: time.sleep(0.5)\n"
            f"sys.exit(0 if len([x for x in ray.nodes() if x['Alive']]) >= {n} else 1)\n"
        )
        res = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=timeout + 60)
        if res.returncode != 0:
            raise RuntimeError(f"cluster did not reach {n} nodes: {res.stderr[-2000:]}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 8
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the node's raylet, GCS and workers, if still there
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


class MlflowServer:
    """A real ``mlflow server`` on loopback (sqlite backend, served artifacts), in its own process
    group: stopped (SIGKILL, as a crash) and restarted on the same port and stores."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> None:
        import urllib.request

        cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}", "--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.root / "server.log", "a")
        # as ray_cluster.yaml's: without MLflow 3's job execution, whose job runner and huey consumers
        # cost about 25 CPU-seconds a start (measured) and serve no tracking call
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer on {self.uri}: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc, signal.SIGKILL)
            self.proc = None
        deadline = time.time() + 20  # the port is free again once nothing listens
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                time.sleep(0.3)
            except OSError:
                return

"""Feature extraction fanned out over a Ray cluster: a job runner for :func:`lada_core.features.cache.build_cache`.

:class:`RayJobRunner` starts a small pool of encoder actors (one per GPU, ``num_gpus=1``; or CPU
actors when the cluster has no GPU or ``--device cpu``). Each actor loads the frozen backbone once and
encodes the shard jobs it is handed; the driver hands out jobs as actors become free (two in flight
per actor, so an actor never waits for its next job), shows one progress bar (images/s, ETA) and
checks that every shard an actor wrote is visible from the driver (the cache root must be storage that
all nodes share: NFS, a mounted bucket). Shards are content-determined (per-(image, view) seeds, whole
shards per job), so the cache is the same bytes as one built by the local runner, and an interrupted
fan-out resumes from its finished shards like a local build.

Connection: an explicit ``address`` (``ray://...`` or ``host:port``) must answer (probed first, so a
wrong address fails in seconds); ``"auto"`` attaches to a running cluster (``RAY_ADDRESS``, the last
``ray start`` on this machine) and otherwise starts a local Ray for the duration of the build. A Ray
that the caller already initialised is used as it is and left running.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from lada_core.config import ConfigError
from lada_core.features.cache import BuildContext, CacheError, ShardJob, _progress, _shard_ok, encode_shard
from sweeps import faults

IN_FLIGHT_PER_WORKER = 2
MAX_ATTEMPTS = 3  # per job, when the actor running it dies (node lost, OOM): the job goes to another actor


class RayUnavailable(ConfigError):
    """No Ray cluster at the given address, or the cluster cannot host an encoder actor."""


class _Encoder:
    """One encoder process: the backbone loaded once, then one shard per call."""

    def __init__(self, ctx: BuildContext, threads: int) -> None:
        import torch

        from lada_core.backbone import load_backbone, resolve_device

        torch.set_num_threads(max(1, threads))  # = the CPUs reserved for this actor
        self.ctx = ctx
        self.device = resolve_device(ctx.device)
        self.backbone = load_backbone(ctx.backbone_name, ctx.pretrained, device=self.device, model_config_dir=ctx.model_config_dir)

    def ready(self) -> tuple[str, int, str]:
        return socket.gethostname(), os.getpid(), str(self.device)

    def encode(self, job: ShardJob) -> tuple[str, int, str]:
        faults.at("cache.encode", task=job.task_index, shard=job.shard)
        encode_shard(job, self.ctx.benchmark.tasks[job.task_index], self.backbone, self.device, self.ctx.batch_size, self.ctx.num_workers)
        return job.path, job.rows, socket.gethostname()


def _reachable(address: str, timeout: float = 5.0) -> bool:
    """Whether something listens at ``host:port`` (also ``ray://host:port``)."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return True  # not host:port (a name Ray resolves itself): let ray.init decide
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _running_cluster() -> str | None:
    """The address ``ray.init(address="auto")`` would use (RAY_ADDRESS, the last ``ray start`` on this
    machine, or a running GCS), or None when there is none."""
    env = os.environ.get("RAY_ADDRESS", "")
    if env:
        return env
    from sweeps import ray_compat

    return ray_compat.running_cluster_address()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unwrap(exc: BaseException) -> BaseException:
    """The user's exception inside a RayTaskError (a DataError naming an unreadable image, ...)."""
    import ray.exceptions

    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, Exception):
        return cause
    return exc


class RayJobRunner:
    """A :data:`~lada_core.features.cache.JobRunner` that encodes shard jobs on Ray actors.

    ``workers``: number of encoder actors (default: one per GPU of the cluster; without GPUs, one per
    ``cpus_per_worker`` CPUs). ``cpus_per_worker``: CPUs reserved per actor (default 1 next to a GPU;
    on CPU-only clusters 1 up to 4 CPUs per node, else 4, which is also the torch thread count).
    ``num_cpus``: CPUs of a local Ray started when no cluster is found (default: all).
    """

    def __init__(
        self,
        address: str | None = "auto",
        workers: int | None = None,
        cpus_per_worker: float | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
        num_cpus: int | None = None,
        start_timeout_s: float = 600.0,
    ) -> None:
        if workers is not None and workers < 1:
            raise ConfigError(f"--ray-workers must be >= 1, got {workers}")
        self.address = address or "auto"
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.progress = progress
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.num_cpus = num_cpus
        self.start_timeout_s = start_timeout_s
        self.summary: dict[str, Any] = {}

    # ---------------------------------------------------------------------------------------- setup

    def _connect(self) -> bool:
        """Attach to Ray; return True when this runner started or attached the driver (and must shut it down).

        Addresses are probed (TCP, 5 s) before ``ray.init``: Ray itself retries an unreachable address
        for minutes."""
        import ray

        if ray.is_initialized():
            return False
        kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
        if self.address != "auto":
            if not _reachable(self.address):
                raise RayUnavailable(f"--address {self.address}: no Ray cluster answers there (start one with 'ray start --head', or check host and port)")
            try:
                ray.init(address=self.address, **kwargs)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise RayUnavailable(f"--address {self.address}: could not connect to a Ray cluster ({_first_line(exc)})") from None
            self.log(f"lada-cache: connected to the Ray cluster at {self.address}")
            return True
        found = _running_cluster()
        env = os.environ.get("RAY_ADDRESS", "")
        if found is not None and _reachable(found):
            ray.init(address=found, **kwargs)
            self.log(f"lada-cache: connected to the running Ray cluster at {found}")
            return True
        if env:
            raise RayUnavailable(f"RAY_ADDRESS={env}: no Ray cluster answers there")
        where = f" (the cluster recorded at {found} does not answer)" if found else ""
        self.log(f"lada-cache: no running Ray cluster found{where}; starting a local one")
        ray.init(num_cpus=self.num_cpus, include_dashboard=False, **kwargs)
        return True

    def _plan(self, ctx: BuildContext, n_jobs: int) -> tuple[int, float, int, str]:
        """(actors, CPUs per actor, GPUs per actor, device inside the actor), checked against the nodes."""
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        total_gpu = sum(float(r.get("GPU", 0)) for r in nodes)
        max_node_cpu = max((float(r.get("CPU", 0)) for r in nodes), default=0.0)
        total_cpu = sum(float(r.get("CPU", 0)) for r in nodes)
        dev = (ctx.device or "auto").lower()
        if dev.startswith("cuda") and total_gpu < 1:
            raise RayUnavailable(f"--device {ctx.device}: the Ray cluster has no GPU (resources: {ray.cluster_resources()})")
        use_gpu = dev != "cpu" and total_gpu >= 1
        cpw = self.cpus_per_worker if self.cpus_per_worker is not None else (1.0 if use_gpu or max_node_cpu <= 4 else 4.0)
        fits = [r for r in nodes if float(r.get("CPU", 0)) >= cpw and (not use_gpu or float(r.get("GPU", 0)) >= 1)]
        if not fits:
            need = f"{cpw:g} CPU" + (" and 1 GPU" if use_gpu else "")
            raise RayUnavailable(f"no node of the Ray cluster can host an encoder ({need}); nodes: {nodes}")
        if self.workers is not None:
            n = self.workers
        elif use_gpu:
            n = int(total_gpu)
        else:
            n = max(1, int(total_cpu // cpw))
        return max(1, min(n, n_jobs)), cpw, 1 if use_gpu else 0, "cuda" if use_gpu else "cpu"

    # ------------------------------------------------------------------------------------------ run

    def __call__(self, jobs: Sequence[ShardJob], ctx: BuildContext) -> None:
        if not jobs:
            return
        import ray

        started = self._connect()
        try:
            self._run(list(jobs), ctx)
        finally:
            if started:
                ray.shutdown()

    def _run(self, jobs: list[ShardJob], ctx: BuildContext) -> None:
        import ray

        n, cpw, gpw, device = self._plan(ctx, len(jobs))
        ctx_ref = ray.put(dataclasses.replace(ctx, device=device))  # the benchmark travels once through the object store
        Encoder: Any = ray.remote(_Encoder).options(num_cpus=cpw, num_gpus=gpw, max_restarts=0, max_concurrency=1)
        threads = max(1, int(cpw))
        need = f"{cpw:g} CPU{' + 1 GPU' if gpw else ''}"
        self.log(f"lada-cache: {len(jobs)} shards on {n} Ray encoder(s) ({need} each, device {device})")
        total_rows = sum(j.rows for j in jobs)
        fan = _FanOut(
            lambda: Encoder.remote(ctx_ref, threads),
            n,
            jobs,
            need=need,
            start_timeout_s=self.start_timeout_s,
            make_bar=lambda: _progress(total_rows, self.progress),
        )
        try:
            fan.run()
        finally:
            fan.close()
        self.summary = {"workers": n, "hosts": sorted(fan.hosts), "seconds": time.time() - fan.t_start, "rows": total_rows}


class _FanOut:
    """The driver's side of one fan-out: encoders starting, encoders with free job slots, jobs in flight.

    Jobs go to free slots (``IN_FLIGHT_PER_WORKER`` per encoder); a job whose encoder died goes back to
    the front of the queue (at most ``MAX_ATTEMPTS`` times), and a replacement encoder starts when no
    other encoder is left to take it. The progress bar starts with the first ready encoder, so that
    img/s and ETA exclude start-up."""

    def __init__(
        self,
        new_actor: Callable[[], Any],
        n: int,
        jobs: Sequence[ShardJob],
        need: str,
        start_timeout_s: float,
        make_bar: Callable[[], Any],
    ) -> None:
        self.new_actor = new_actor
        self.need = need
        self.start_timeout_s = start_timeout_s
        self.make_bar = make_bar
        self.todo: deque[ShardJob] = deque(jobs)
        self.attempts: dict[str, int] = {}
        self.actors: list[Any] = []
        self.waiting_ready: dict[Any, Any] = {}  # ready ref -> actor
        self.free_slots: dict[Any, int] = {}  # ready actor -> free job slots
        self.inflight: dict[Any, tuple[Any, ShardJob]] = {}  # job ref -> (actor, job)
        self.hosts: set[str] = set()
        self.init_errors: list[str] = []
        self.bar: Any = None
        self.t_start = time.time()
        for _ in range(n):
            self._start_actor()

    def _start_actor(self) -> None:
        actor = self.new_actor()
        self.actors.append(actor)
        self.waiting_ready[actor.ready.remote()] = actor

    def run(self) -> None:
        import ray

        while self.todo or self.inflight:
            self._hand_out()
            if not self.inflight and not self.free_slots and not self.waiting_ready:
                raise CacheError("every Ray encoder failed to start: " + "; ".join(dict.fromkeys(self.init_errors)))
            done, _ = ray.wait(list(self.inflight) + list(self.waiting_ready), num_returns=1, timeout=30.0)
            if not done:
                if not self.free_slots and time.time() - self.t_start > self.start_timeout_s:
                    raise RayUnavailable(
                        f"no Ray encoder started within {self.start_timeout_s:.0f}s (the cluster is busy or cannot "
                        f"host {self.need} per encoder)"
                    )
            elif done[0] in self.waiting_ready:
                self._on_ready(done[0])
            else:
                self._on_done(done[0])

    def _hand_out(self) -> None:
        for actor, slots in list(self.free_slots.items()):
            while slots > 0 and self.todo:
                job = self.todo.popleft()
                self.inflight[actor.encode.remote(job)] = (actor, job)
                slots -= 1
            self.free_slots[actor] = slots

    def _on_ready(self, ref: Any) -> None:
        import ray
        import ray.exceptions

        actor = self.waiting_ready.pop(ref)
        try:
            host, _pid, _dev = ray.get(ref)
        except Exception as exc:  # the actor's constructor failed (unknown model, no weights, ...)
            cause = _unwrap(exc)
            if not isinstance(cause, ray.exceptions.RayError):
                raise cause from None
            self.init_errors.append(_first_line(cause))
            return
        self.hosts.add(host)
        self.free_slots[actor] = IN_FLIGHT_PER_WORKER
        if self.bar is None:
            self.bar = self.make_bar()

    def _on_done(self, ref: Any) -> None:
        import ray
        import ray.exceptions

        actor, job = self.inflight.pop(ref)
        try:
            _path, rows, host = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None  # DataError naming the image, CacheError, ...
        except ray.exceptions.RayError as exc:  # the actor died: retry its job elsewhere
            self._on_died(actor, job, exc)
            return
        if not _shard_ok(job):
            raise CacheError(
                f"shard {job.path} was written on node {host} but is not visible here: the cache root must be "
                f"storage shared by every Ray node (NFS, a mounted bucket)"
            )
        self.free_slots[actor] = self.free_slots.get(actor, 0) + 1
        if self.bar is not None:
            self.bar.update(rows)

    def _on_died(self, actor: Any, job: ShardJob, exc: BaseException) -> None:
        self.free_slots.pop(actor, None)
        self.attempts[job.path] = self.attempts.get(job.path, 0) + 1
        if self.attempts[job.path] >= MAX_ATTEMPTS:
            raise CacheError(f"shard {job.path}: encoder died {MAX_ATTEMPTS} times ({_first_line(exc)})") from None
        self.todo.appendleft(job)
        if not self.free_slots and not self.waiting_ready and not any(a is not actor for a, _ in self.inflight.values()):
            self._start_actor()

    def close(self) -> None:
        import ray

        if self.bar is not None:
            self.bar.close()
        for a in self.actors:
            ray.kill(a)


__all__ = ["RayJobRunner", "RayUnavailable"]

"""Data-parallel trials: one trial on several GPUs of a node, with ``torch.distributed``.

A trial that Ray gives ``n > 1`` GPUs (``--gpus-per-trial 2``) runs ``n`` processes: the trial's own
process is rank 0 (it reports to Tune and writes the per-task checkpoints) and ``n - 1`` spawned
helpers are ranks 1..n-1. Each rank runs the same :func:`lada_core.trainer.run_continual`; the trainer
notices the initialised process group, takes rows ``rank::world`` of every batch, normalises the
loss by the global batch and sums the gradients over ranks before the optimizer step, so the update
equals the single-process one up to float error.

Backend: NCCL on CUDA (rank r uses ``cuda:r`` of the GPUs Ray assigned, which it exposes through
``CUDA_VISIBLE_DEVICES``), gloo otherwise (the CPU tests). Every rank uses the same output folder
(the trial's, on its node): the helpers read rank 0's checkpoints to resume at the same task.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

TIMEOUT = datetime.timedelta(minutes=30)


def free_port() -> int:
    """A free TCP port on the loopback interface (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def choose_backend(world_size: int) -> str:
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def cpu_threads_per_rank(world_size: int) -> int:
    """CPU threads for each rank: the trial's CPUs (Ray sets ``OMP_NUM_THREADS`` to them) shared out,
    so that the ranks do not oversubscribe the cores while they wait on each other every step."""
    try:
        total = int(os.environ.get("OMP_NUM_THREADS") or 0) or (os.cpu_count() or 1)
    except ValueError:
        total = os.cpu_count() or 1
    return max(1, total // world_size)


def _init(rank: int, world_size: int, port: int, backend: str, threads: int | None = None) -> Any:
    """Join the process group; returns the thread limiter to restore afterwards (or None)."""
    import torch
    import torch.distributed as dist

    limiter = None
    if threads:
        torch.set_num_threads(threads)
        try:
            from threadpoolctl import threadpool_limits

            limiter = threadpool_limits(threads)  # scikit-learn's k-means and mixtures
        except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
            pass
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=TIMEOUT
    )
    return limiter


def _helper(rank: int, world_size: int, port: int, backend: str, cfg_dict: dict[str, Any], bundle_path: str | None, output_dir: str, errors: Any, threads: int | None = None) -> None:
    """Ranks 1..n-1: the same training, no reports, no checkpoints."""
    try:
        import torch.distributed as dist

        from lada_core.config import from_dict
        from lada_core.features import load_bundle
        from lada_core.trainer import run_continual

        _init(rank, world_size, port, backend, threads)
        try:
            cfg = from_dict(cfg_dict)
            bundle = load_bundle(bundle_path) if bundle_path else None
            run_continual(cfg, bundle, output_dir, on_task_end=None, log=lambda m: None)
        finally:
            dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc(limit=5)}")
        raise SystemExit(1) from None


def _open_inputs(cfg: Any, bundle_path: str | Path | None, bundle: Any, backbone: Any,
                 timings: dict[str, Any] | None) -> tuple[Any, Any]:
    """The feature bundle (opened unless given) and, when ``timings`` are measured, the backbone
    (built here so that its time is measured apart from the training: bench/sweep_overhead.py)."""
    import time

    from lada_core.features import load_bundle

    t0 = time.time()
    if bundle is None and bundle_path:
        bundle = load_bundle(bundle_path)
    t1 = time.time()
    if timings is not None:
        if backbone is None:
            from lada_core.backbone import load_backbone

            backbone = load_backbone(cfg.backbone.model, cfg.backbone.pretrained, device="cpu", model_config_dir=cfg.backbone.model_config_dir)
        timings["bundle_s"] = timings.get("bundle_s", 0.0) + t1 - t0
        timings["backbone_s"] = timings.get("backbone_s", 0.0) + time.time() - t1
    return bundle, backbone


def run_continual_parallel(
    cfg: Any,
    bundle_path: str | Path | None,
    output_dir: str | Path,
    world_size: int,
    on_task_end: Callable[[Any], None] | None = None,
    backend: str | None = None,
    log: Callable[[str], None] | None = None,
    timings: dict[str, Any] | None = None,
    bundle: Any = None,
    backbone: Any = None,
) -> Any:
    """Run :func:`lada_core.trainer.run_continual` over ``world_size`` processes; this process is rank 0.
    ``bundle`` / ``backbone``: already opened ones to use (a worker that runs one trial after another
    keeps them, see :mod:`sweeps.trainable`); by default they are opened here.

    Returns rank 0's :class:`~lada_core.trainer.RunResult`. A failing helper fails the run; when
    rank 0 stops (an exception, e.g. a Tune stop raised from ``on_task_end``) the helpers are ended.
    """
    import torch.distributed as dist

    from lada_core.trainer import run_continual

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    bundle, backbone = _open_inputs(cfg, bundle_path, bundle, backbone, timings)
    if world_size == 1:
        return run_continual(cfg, bundle, output_dir, on_task_end=on_task_end, log=log, backbone=backbone)
    backend = backend or choose_backend(world_size)
    port = free_port()
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    cfg_dict = cfg.to_dict()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    threads = cpu_threads_per_rank(world_size) if backend == "gloo" else None
    helpers = [
        ctx.Process(
            target=_helper,
            args=(r, world_size, port, backend, cfg_dict, str(bundle_path) if bundle_path else None, str(output_dir), errors, threads),
            daemon=True,
            name=f"lada-rank{r}",
        )
        for r in range(1, world_size)
    ]
    for p in helpers:
        p.start()
    ok = False
    try:
        import torch

        threads_before = torch.get_num_threads()
        limiter = _init(0, world_size, port, backend, threads)
        try:
            result = run_continual(cfg, bundle, output_dir, on_task_end=on_task_end, log=log, backbone=backbone)
        finally:
            dist.destroy_process_group()
            torch.set_num_threads(threads_before)
            if limiter is not None:
                limiter.restore_original_limits()
        for p in helpers:
            p.join(timeout=TIMEOUT.total_seconds())
        failed = [p for p in helpers if p.exitcode != 0]
        if failed:
            detail = errors.get() if not errors.empty() else f"exit codes {[p.exitcode for p in failed]}"
            raise RuntimeError(f"data-parallel helper failed: {detail}")
        ok = True
        return result
    finally:
        if not ok:
            for p in helpers:
                if p.is_alive():
                    p.terminate()
            for p in helpers:
                p.join(timeout=10)

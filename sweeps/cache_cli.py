"""``lada-cache``: :func:`lada_core.cli.cache_main` plus a Ray fan-out of the extraction.

``--ray`` encodes the shards on Ray actors (:class:`sweeps.ray_cache.RayJobRunner`): one per GPU of
the cluster (or CPU actors), each loading the backbone once. It attaches to a running cluster
(``ray start``, ``RAY_ADDRESS``, or ``--address``) and otherwise starts a local Ray for the build.
Without ``--ray`` this module never imports Ray: the command is the plain ``lada_core`` one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from lada_core.cli import cache_main


def add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray fan-out (needs the 'sweep' extra)")
    g.add_argument("--ray", action="store_true", help="encode on Ray actors, one per GPU of the cluster (CPU actors without GPUs); attaches to a running cluster, else starts a local Ray")
    g.add_argument("--address", metavar="ADDR", help="Ray cluster address (host:port or ray://host:10001); implies --ray (default with --ray: auto-detect a running cluster)")
    g.add_argument("--ray-workers", type=int, metavar="N", help="number of encoder actors (default: one per GPU; without GPUs, one per --ray-cpus-per-worker CPUs)")
    g.add_argument("--ray-cpus-per-worker", type=float, metavar="C", help="CPUs reserved per encoder actor (default 1 next to a GPU; on CPU-only clusters 1, or 4 on nodes with more than 4 CPUs)")


def make_runner(args: argparse.Namespace) -> Any:
    """The job runner the flags ask for: a :class:`~sweeps.ray_cache.RayJobRunner`, or None (local)."""
    if not (args.ray or args.address or args.ray_workers or args.ray_cpus_per_worker):
        return None
    from sweeps.ray_cache import RayJobRunner  # imports ray only here

    runner = RayJobRunner(
        address=args.address or "auto",
        workers=args.ray_workers,
        cpus_per_worker=args.ray_cpus_per_worker,
        progress=not args.quiet,
    )
    workers = args.workers

    def run(jobs: Sequence[Any], ctx: Any) -> None:
        ctx.num_workers = workers  # DataLoader decoding processes inside each actor
        runner(jobs, ctx)

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lada-cache`` console script."""
    return cache_main(argv, extra_args=add_ray_args, make_runner=make_runner)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

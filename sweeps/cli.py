"""``lada-sweep``: a sweep of LADA settings with Ray Tune, Optuna and MLflow.

Offline demo on one machine (a local Ray, a sqlite MLflow store in the working folder)::

    lada-sweep --space lada_smoke
    mlflow ui --backend-store-uri sqlite:///mlflow.db

On a cluster (``ray up ray_cluster.yaml``; then on the head node)::

    lada-sweep --address auto --space lada_full --benchmark xtail --data-root /mnt/shared/data \\
        --storage /mnt/shared/sweeps --gpus-per-trial 0.25 --scheduler asha --num-samples 64

Order of work: check every input (space, metric, benchmark, ``--set``, resources, the Ray address)
and fail with one clear line before anything runs (:mod:`sweeps.plan`); build or find the feature
cache once; open the parent MLflow run and the Optuna study (next to the results); run the trials;
write the best config (:mod:`sweeps.runner`). ``--resume`` continues a sweep whose driver was stopped,
with its study, results and MLflow runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from sweeps.settings import DEFAULT_STORAGE


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to a flag's help unless the help already says its default, or there is
    none to say (None, False: the flag's absence)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from search_spaces import space_names

    p = argparse.ArgumentParser(
        prog="lada-sweep",
        description="Sweep LADA settings: Ray Tune runs the trials, Optuna chooses the settings, MLflow records every task step.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("what to search")
    g.add_argument("--space", default=None, help=f"search space (one of: {', '.join(space_names())}; default lada_smoke)")
    g.add_argument("--benchmark", default=None, help="task sequence: mini-tail, xtail, xtail-order2 or a benchmark .yaml file (default: the space's or the config's)")
    g.add_argument("--data-root", default=None, help="folder holding the benchmark's datasets (X-TAIL: the CoOp layout)")
    g.add_argument("--num-samples", type=int, default=None, help="number of trials (default: the space's)")
    g.add_argument("--metric", default=None, help="objective: transfer, average, last, or a weighted mix like last=0.5,average=0.5 (default: the space's)")
    g.add_argument("--seed", type=int, default=None, help="seed of the Optuna sampler and of every trial's training (train.seed); default 0")
    g.add_argument("--config", default=None, help="a lada-train YAML config to start from")
    g.add_argument("--tiny-model", action="store_true", default=None, help="use the small random-init model lada_core ships (lada-tiny): an offline demo of any space")
    g.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", help="override a config value (repeatable), e.g. --set optim.epochs_scale=0.5")
    g.add_argument("--point", action="append", default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                   help="evaluate this point of the space right after the space's own first points, before the sampler's (repeatable), "
                        "e.g. --point optim.lr=3e-3,lada.memory_size=8; every name must be one the space suggests, the others keep being sampled")
    g.add_argument("--final-eval", action="store_true",
                   help="after the sweep, run the final evaluation (lada-sweep-evaluate): the top configs by validation objective and "
                        "the paper defaults, each trained with several seeds and scored on test")
    g.add_argument("--final-top", type=int, default=3, help="--final-eval: configs besides the paper defaults (default 3)")
    g.add_argument("--final-seeds", type=int, default=3, help="--final-eval: seeds per config (default 3)")
    g.add_argument("--peek-test", action="store_true", default=None,
                   help="also log test/... metrics in every trial run, for exploration; trials are still scored and selected on val/... "
                        "metrics, and the summary says that the best was selected with test data in view")
    g = p.add_argument_group("scheduling")
    g.add_argument("--scheduler", choices=("fifo", "asha"), default=None, help="fifo runs every trial to its last task; asha stops trials that are weak after a task (default: the space's)")
    g.add_argument("--grace-period", type=int, default=None, help="ASHA: tasks every trial runs before it can be stopped (default 1)")
    g.add_argument("--reduction-factor", type=float, default=None, help="ASHA: keep the best 1/factor at each rung (default 2)")
    g.add_argument("--gpus-per-trial", type=float, default=None, help="GPUs per trial; a fraction packs trials on one GPU, N > 1 runs the trial data-parallel on N GPUs (default: 1 if the cluster has GPUs, else 0)")
    g.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs per trial (default 1)")
    g.add_argument("--max-concurrent", type=int, default=0, help="at most this many trials at once (0: as many as the resources allow)")
    g.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial, each from its last finished task")
    g.add_argument("--time-budget-s", type=float, default=None, help="stop the sweep after this many seconds")
    g.add_argument("--no-reuse-actors", action="store_true",
                   help="start a fresh worker process for every trial (each one then imports torch and open_clip and builds the model again); "
                        "by default a worker runs the node's next trial")
    g = p.add_argument_group("where it runs and what it keeps")
    g.add_argument("--address", default=None, help="a running Ray cluster (host:port, or auto); default: start a local Ray")
    g.add_argument("--local-cpus", type=int, default=None, help="CPUs of the local Ray started without --address (default: all)")
    g.add_argument("--local-gpus", type=int, default=None, help="GPUs of the local Ray (default: the visible ones); logical GPUs are possible for tests")
    g.add_argument("--storage", default=DEFAULT_STORAGE, help="trial results and checkpoints: a local or shared folder, or a cloud URI (s3://, gs://)")
    g.add_argument("--study-storage", default=None, help="Optuna storage URL (default: sqlite optuna.db next to the results; a local file when --storage is a cloud URI)")
    g.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db in the working folder)")
    g.add_argument("--experiment", default=None, help="MLflow experiment of the parent run (default lada-sweeps)")
    g.add_argument("--name", default=None, help="sweep name: the results folder, the Optuna study and the parent run (default <space>-<benchmark>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the sweep --name after its driver stopped: same study, results and MLflow runs")
    g.add_argument("--encode-on", choices=("driver", "ray"), default="driver", help="build the feature cache in the driver, or fan it out as Ray tasks (one per shard)")
    g.add_argument("--verbose", type=int, default=0, choices=(0, 1, 2),
                   help="0: a header, a progress line, a line per finished trial and the summary (Ray's, Optuna's and MLflow's logs go to "
                        "lada-sweep.log in the sweep's folder, the trials' output to Ray's session folder); 1: also Tune's status tables, "
                        "the libraries' logs and the trials' output (per-epoch lines); 2: also a line per trial result")
    return p


def _exit_codes() -> tuple[tuple[tuple[type[BaseException], ...], int], ...]:
    """Exception types -> exit code: 2 bad input (before anything starts), 3 the results folder cannot
    be written, 130 interrupted."""
    from lada_core.backbone import BackboneError
    from lada_core.benchmarks import DataError
    from lada_core.config import ConfigError
    from search_spaces import UnknownSpaceError
    from sweeps.objective import MetricError
    from sweeps.resources import ResourceError
    from sweeps.settings import UsageError
    from sweeps.storage import EXIT_STORAGE, StorageError

    return (
        ((UsageError, UnknownSpaceError, MetricError, ConfigError, ResourceError, DataError, BackboneError), 2),
        ((StorageError,), EXIT_STORAGE),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lada-sweep``; returns the exit code (0: a trial completed, 1: none did,
    2: bad input, 3: the results folder could not be written - disk full, read-only - and the sweep
    stopped, 130: interrupted)."""
    t0 = time.time()  # the sweep's wall time counts from here (the heavy imports are lazy)
    args = build_parser().parse_args(argv)
    args.t0 = t0
    table = _exit_codes()
    try:
        from sweeps.plan import prepare
        from sweeps.runner import run
        from sweeps.settings import RunOptions, resolve

        plan = prepare(resolve(args), RunOptions.from_args(args))
        code = run(plan)
        if code == 0 and args.final_eval:
            from sweeps.evaluate import main as evaluate_main

            s = plan.settings
            code = evaluate_main(["--name", s.name, "--storage", s.storage, "--top", str(args.final_top), "--seeds", str(args.final_seeds),
                                  "--max-failures", str(args.max_failures), *(["--address", args.address] if args.address else []),
                                  *(["--local-cpus", str(args.local_cpus)] if args.local_cpus else [])])
        return code
    except KeyboardInterrupt:
        print("lada-sweep: interrupted; continue with --resume --name <name>", file=sys.stderr)
        return 130
    except Exception as exc:
        for types, code in table:
            if isinstance(exc, types):
                print(f"lada-sweep: error: {exc}", file=sys.stderr)
                return code
        raise


if __name__ == "__main__":
    sys.exit(main())

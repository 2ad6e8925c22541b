"""Command lines: ``lada-cache`` (build / check a feature cache) and ``lada-train`` (a whole sequence).

Both read a config from ``--config FILE`` plus ``--set key=value`` overrides (dotted parameter
names, see ``lada_core.config``). Bad input gets one line on stderr and exit code 2; a failure
during the run (diverged training, a corrupt cache) exit code 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (sections backbone, data, lada, optim, train)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting, e.g. --set lada.memory_size=8 --set optim.lr=3e-4 (repeatable)",
    )
    p.add_argument("--benchmark", help="shortcut for --set data.benchmark=NAME (mini-tail, xtail, xtail-order2, or a .yaml file)")
    p.add_argument("--data-root", help="shortcut for --set data.data_root=DIR")
    p.add_argument("--shots", help="shortcut for --set data.shots=N ('full' for full-shot)")
    p.add_argument("--cache-root", help="shortcut for --set data.cache_root=DIR")


def _build_cfg(args: argparse.Namespace) -> Any:
    from lada_core.config import build_config

    sets = list(args.overrides)
    shortcuts = {"benchmark": "data.benchmark", "data_root": "data.data_root", "cache_root": "data.cache_root"}
    for attr, key in shortcuts.items():
        if getattr(args, attr, None) is not None:
            sets.insert(0, f"{key}={getattr(args, attr)}")
    if getattr(args, "shots", None) is not None:
        sets.insert(0, "data.shots=null" if str(args.shots).lower() in ("full", "none", "null") else f"data.shots={args.shots}")
    if getattr(args, "device", None) is not None:
        sets.insert(0, f"data.device={args.device}")
    if getattr(args, "batch_size", None) is not None:
        sets.insert(0, f"data.encode_batch_size={args.batch_size}")
    if getattr(args, "views", None) is not None:
        sets.insert(0, f"data.views={args.views}")
    return build_config(args.config, None, sets)


def _user_errors() -> tuple[type[Exception], ...]:
    from lada_core.backbone import BackboneError
    from lada_core.benchmarks.base import DataError
    from lada_core.config import ConfigError
    from lada_core.trainer import ResumeError

    return (ConfigError, DataError, BackboneError, ResumeError)


def _fail(prog: str, msg: str, code: int) -> int:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return code


def _guard(prog: str, fn: Callable[[], int]) -> int:
    """Run ``fn``; turn known errors into one line and an exit code, never a traceback."""
    from lada_core.features.cache import CacheError
    from lada_core.trainer import DivergenceError

    try:
        return fn()
    except CacheError as exc:
        return _fail(prog, str(exc), EXIT_FAIL)
    except _user_errors() as exc:
        return _fail(prog, str(exc), EXIT_USAGE)
    except DivergenceError as exc:
        return _fail(prog, str(exc), EXIT_FAIL)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted (finished work is kept; run the same command again to continue)", 130)
    except OSError as exc:
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        return _fail(prog, f"{exc.strerror or exc}:{where}", EXIT_FAIL)


# --------------------------------------------------------------------------------------------------
# lada-cache


def cache_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lada-cache",
        description="Encode a benchmark's images once with the frozen CLIP image encoder into a content-addressed "
        "Parquet feature cache (a pool of augmented views per training image plus one test-transform view). "
        "A second run with the same inputs reuses the cache; an interrupted run resumes from its finished shards. "
        "Prints the cache folder on stdout.",
    )
    _config_args(p)
    p.add_argument("--views", type=int, help="augmented views per training image (data.views)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (data.device)")
    p.add_argument("--batch-size", type=int, help="images per encoder batch (data.encode_batch_size)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes for image decoding (default 0)")
    p.add_argument("--splits", help="comma-separated splits to encode, each into its own folder (default: train, val where every "
                   "task has one, test); a sweep needs train,val, lada-train train,test")
    p.add_argument("--check", metavar="DIR", help="verify the cache in DIR (manifest, every shard's rows and hashes) and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _cache_splits(cfg: Any, flag: str | None) -> tuple[str, ...]:
    """``--splits`` as a tuple; by default train, val (where every task has one) and test."""
    if flag:
        return tuple(x.strip() for x in flag.split(",") if x.strip())
    from lada_core.benchmarks import benchmark_for

    return ("train",) + (("val",) if benchmark_for(cfg.data).has_split("val") else ()) + ("test",)


def cache_main(argv: Sequence[str] | None = None, run_jobs: Any = None, extra_args: Callable[[argparse.ArgumentParser], None] | None = None, make_runner: Callable[[argparse.Namespace], Any] | None = None) -> int:
    """``lada-cache``. ``extra_args``/``make_runner`` let a wrapper add flags that fan extraction out
    (the sweep layer's ``--ray``) without this module knowing about Ray."""
    p = cache_parser()
    if extra_args:
        extra_args(p)
    args = p.parse_args(argv)

    def run() -> int:
        from lada_core.features import check_cache, ensure_cache

        if args.check:
            problems = check_cache(args.check)
            if problems:
                for line in problems:
                    print(f"lada-cache: {line}", file=sys.stderr)
                print(f"lada-cache: {args.check}: {len(problems)} problem(s)", file=sys.stderr)
                return EXIT_FAIL
            print(f"{args.check}: ok")
            return EXIT_OK
        cfg = _build_cfg(args)
        runner = make_runner(args) if make_runner else run_jobs
        info = ensure_cache(cfg, progress=not args.quiet, run_jobs=runner, num_workers=args.workers, splits=_cache_splits(cfg, args.splits))
        if info.reused:
            print(f"lada-cache: reused existing cache (key {info.key})", file=sys.stderr)
        else:
            rate = info.images / info.seconds if info.seconds else 0.0
            print(f"lada-cache: built cache (key {info.key}): {info.images} images in {info.seconds:.1f}s ({rate:.0f} img/s)", file=sys.stderr)
        print(info.path)
        return EXIT_OK

    return _guard("lada-cache", run)


# --------------------------------------------------------------------------------------------------
# lada-train


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lada-train",
        description="Train LADA over a whole task sequence on cached CLIP features (built on first use). Writes the "
        "accuracy matrix, the metrics and a checkpoint per task to --output; restarted on the same folder, it resumes "
        "from the last finished task.",
    )
    _config_args(p)
    p.add_argument("--output", "-o", metavar="DIR", help="output folder (required unless --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="build the model for every task without training; print the task plan and trainable parameter counts as JSON")
    p.add_argument("--no-cache", action="store_true", help="exact mode: run the frozen image encoder inside the training loop with fresh augmentation every epoch")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    return p


def dry_run_plan(cfg: Any) -> dict[str, Any]:
    """The task plan and the trainable parameter count of every task, without training."""
    from lada_core.backbone import load_backbone
    from lada_core.benchmarks import benchmark_for
    from lada_core.model import AdaptedTextEncoder
    from lada_core.trainer import task_epochs, trainable_count

    bench = benchmark_for(cfg.data)
    bb = load_backbone(cfg.backbone.model, cfg.backbone.pretrained, device="cpu", model_config_dir=cfg.backbone.model_config_dir)
    tasks = []
    for k, task in enumerate(bench.tasks):
        enc = AdaptedTextEncoder(bb.text_module, cfg.lada.adapter_bottleneck, cfg.lada.adapter_residual)
        counts = task.class_counts()
        units = int(sum(min(cfg.lada.memory_size, int(c)) for c in counts)) if cfg.lada.use_units else 0
        adapters = sum(p.numel() for p in enc.parameters())
        tasks.append(
            {
                "index": k,
                "name": task.name,
                "classes": task.num_classes,
                "class_names": task.class_names,
                "train_images": len(task.train),
                "val_images": len(task.val) if task.val is not None else 0,
                "test_images": len(task.test) if cfg.eval.split == "test" or cfg.eval.peek_test else None,  # not opened otherwise
                "epochs": task_epochs(cfg, task.epochs),
                "memory_units": units,
                "trainable_params": trainable_count(enc, units, bb.embed_dim),
                "adapter_params": adapters,
            }
        )
    return {
        "benchmark": bench.name,
        "backbone": cfg.backbone.model,
        "pretrained": cfg.backbone.pretrained,
        "variant": cfg.lada.variant,
        "embed_dim": bb.embed_dim,
        "num_tasks": len(tasks),
        "num_classes": len(bench.class_names),
        "tasks": tasks,
    }


def write_outputs(out: Path, result: Any, cfg: Any) -> None:
    """matrix.csv (rows = after step j, columns = datasets), metrics.json, config.yaml."""
    from lada_core.config import config_to_yaml

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "matrix.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["after_task", *result.task_names])
        for name, row in zip(result.task_names, result.matrix):
            w.writerow([name, *[f"{a:.4f}" for a in row]])
    (out / "metrics.json").write_text(
        json.dumps({"summary": result.summary, "per_dataset": result.per_dataset, "task_names": result.task_names, "seconds": result.seconds}, indent=2)
    )
    (out / "config.yaml").write_text(config_to_yaml(cfg))


def train_main(argv: Sequence[str] | None = None) -> int:
    p = train_parser()
    args = p.parse_args(argv)
    if not args.dry_run and not args.output:
        p.error("--output DIR is required (or --dry-run)")

    def run() -> int:
        cfg = _build_cfg(args)
        if args.no_cache:
            from lada_core.config import from_dict

            cfg = from_dict({"data.exact": True}, cfg)
        if args.dry_run:
            print(json.dumps(dry_run_plan(cfg), indent=2))
            return EXIT_OK
        result = train(cfg, Path(args.output), quiet=args.quiet)
        s = result.summary
        print(f"lada-train: transfer {s['transfer']:.2f}  average {s['average']:.2f}  last {s['last']:.2f}  -> {args.output}", file=sys.stderr)
        return EXIT_OK

    return _guard("lada-train", run)


def train(cfg: Any, out: Path, quiet: bool = False, on_task_end: Any = None) -> Any:
    """Build or find the cache (or set up exact mode), train, write the outputs."""
    from lada_core.backbone import load_backbone, resolve_device
    from lada_core.benchmarks import benchmark_for
    from lada_core.features import ensure_cache, load_bundle
    from lada_core.features.source import ExactSource
    from lada_core.trainer import run_continual

    log = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    t0 = time.time()
    bench = benchmark_for(cfg.data)  # cheap errors first
    bb = load_backbone(cfg.backbone.model, cfg.backbone.pretrained, device="cpu", model_config_dir=cfg.backbone.model_config_dir)
    if cfg.data.exact:
        source = ExactSource(bench, bb, resolve_device(cfg.train.device), cfg.data.encode_batch_size, cfg.eval.split)
        result = run_continual(cfg, None, out, on_task_end=on_task_end, backbone=bb, source=source, log=log)
    else:
        info = ensure_cache(cfg, progress=not quiet, backbone=bb, log=log)
        result = run_continual(cfg, load_bundle(info.path), out, on_task_end=on_task_end, backbone=bb, log=log)
    result.seconds = time.time() - t0
    write_outputs(out, result, cfg)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())

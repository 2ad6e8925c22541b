"""The same trial in exact mode (the image encoder inside the loop) and on the feature cache.

Exact mode (:class:`lada_core.features.source.ExactSource`, ``lada-train --no-cache``) encodes the
test images of every task and, every epoch, fresh augmented views of the training images, in every
trial. Cached mode encodes the benchmark once (``ensure_cache``: the test view of every image and
``--views`` augmented views per training image) and every trial then trains on the memory-mapped
features (``CachedSource``). So a sweep of N trials costs

    exact:   N x (exact trial)
    cached:  one encoding + N x (cached trial)

The script builds the cache (timed: the one-time cost), runs one cached trial and one exact trial of
the same config, and prints both times, their ratio, the encoding cost, the break-even number of
trials and what sweeps of a few sizes cost each way. Model loading is timed apart (both pay it).

    python bench/cache_vs_exact.py                          # lada-small on mini-tail 16-shot (CPU: minutes)
    python bench/cache_vs_exact.py --model ViT-B-16 --device cuda

Models are random init (``backbone.pretrained=null``: no download); the accuracies printed are a
sanity check that both modes trained, not CLIP's numbers.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/cache_vs_exact.py",
        description="Time one trial in exact mode (encoder in the loop) and on the feature cache, plus the one-time encoding.",
    )
    p.add_argument("--model", default="lada-small",
                   help="open_clip architecture, random init (default lada-small: a scaled-down ViT/CLIP that runs in minutes on 2 CPU cores; "
                        "ViT-B-16 on a GPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N, for encoding and training (default auto)")
    p.add_argument("--benchmark", default="mini-tail", help="benchmark (default mini-tail)")
    p.add_argument("--data-root", default=None, help="data root of the benchmark (mini-tail: a folder with the Fashion-MNIST idx files)")
    p.add_argument("--shots", default="16", help="training images per class, or 'full' (default 16)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per task, both modes (default 3)")
    p.add_argument("--views", type=int, default=10, help="augmented views cached per training image (default 10, as the sweeps use)")
    p.add_argument("--encode-batch", type=int, default=256, help="images per encoder batch, both modes (default 256)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the cache build (default 0, like exact mode)")
    p.add_argument("--no-warmup", action="store_true", help="do not run an untimed cached trial first (process start-up then falls on the cached trial)")
    p.add_argument("--trials", default="1,10,50,200", help="sweep sizes to price (comma-separated, default 1,10,50,200)")
    p.add_argument("--cache-root", default=None, help="where the cache goes (default: a temporary folder, removed at the end)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="extra config override (repeatable)")
    return p.parse_args(argv)


def _fmt(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lada_core.backbone import load_backbone, resolve_device
    from lada_core.benchmarks import benchmark_for
    from lada_core.config import build_config
    from lada_core.features import ensure_cache, load_bundle
    from lada_core.features.source import ExactSource
    from lada_core.trainer import run_continual

    trials = [int(t) for t in args.trials.split(",") if t.strip()]
    work = Path(tempfile.mkdtemp(prefix="cache-vs-exact-"))
    cache_root = Path(args.cache_root) if args.cache_root else work / "cache"
    shots = "null" if str(args.shots).lower() in ("full", "null", "none") else args.shots
    overrides = [
        f"backbone.model={args.model}",
        "backbone.pretrained=null",
        f"data.benchmark={args.benchmark}",
        f"data.shots={shots}",
        f"data.views={args.views}",
        f"data.cache_root={cache_root}",
        f"data.encode_batch_size={args.encode_batch}",
        f"data.device={args.device}",
        f"train.device={args.device}",
        f"optim.epochs={args.epochs}",
        *([f"data.data_root={args.data_root}"] if args.data_root else []),
        *args.overrides,
    ]
    cfg = build_config(overrides=overrides)
    device = resolve_device(cfg.train.device)
    quiet = lambda m: None  # noqa: E731

    t = time.perf_counter()
    bench = benchmark_for(cfg.data)
    bb = load_backbone(cfg.backbone.model, None, device="cpu", model_config_dir=cfg.backbone.model_config_dir)
    t_load = time.perf_counter() - t
    n_train = sum(len(task.train) for task in bench.tasks)
    n_test = sum(len(task.test) for task in bench.tasks)
    n_aug = sum(len(task.train) for task in bench.tasks if task.augment)
    import torch

    params = sum(p.numel() for p in bb.model.parameters()) / 1e6
    tr = getattr(bb.model.visual, "transformer", None)
    vis = f"vision {len(tr.resblocks)} x {tr.width}, " if tr is not None else ""
    txt = bb.text_module.transformer
    print(f"cache_vs_exact: model {args.model} (random init, {params:.1f}M parameters, {bb.image_size}px input, {vis}"
          f"text {len(txt.resblocks)} x {txt.width}), device {device}"
          + (f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
          + f", torch threads {torch.get_num_threads()}")
    print(f"  {cfg.data.benchmark}, {len(bench.tasks)} tasks, {args.shots}-shot: {n_train} training images ({n_aug} augmented), "
          f"{n_test} test images; {args.epochs} epochs per task; {args.views} cached views per training image")
    print(f"  model load {t_load:.1f}s (both modes pay it)\n")

    # 1. one-time encoding into the cache
    t = time.perf_counter()
    info = ensure_cache(cfg, progress=False, backbone=bb, log=quiet, num_workers=args.workers)
    _sync(device)
    t_encode = time.perf_counter() - t
    if info.reused:
        print(f"  note: the cache at {info.path} already existed; the encoding time below is only the check of it")
    t = time.perf_counter()
    bundle = load_bundle(info.path)
    t_open = time.perf_counter() - t
    print(f"one-time encoding (cache build, {n_train * (args.views + 1) if args.views else n_train} + {n_test} images): "
          f"{_fmt(t_encode)}  ({bundle.nbytes() / 2**20:.1f} MiB of features; opening it: {1e3 * t_open:.0f} ms)")

    # 2. one cached trial; first an untimed one, so that neither mode pays the process's one-time
    # start (CUDA context, lazily loaded kernels, thread pools): in a sweep, workers are reused
    if not args.no_warmup:
        t = time.perf_counter()
        run_continual(cfg, bundle, work / "warmup", backbone=bb, log=quiet)
        _sync(device)
        print(f"(warm-up: a first cached trial in this process took {_fmt(time.perf_counter() - t)}; not counted)")
    t = time.perf_counter()
    cached = run_continual(cfg, bundle, work / "cached", backbone=bb, log=quiet)
    _sync(device)
    t_cached = time.perf_counter() - t
    print(f"cached trial:  {_fmt(t_cached):>10s}   transfer {cached.summary['transfer']:.1f}  average {cached.summary['average']:.1f}  "
          f"last {cached.summary['last']:.1f}")

    # 3. the same trial in exact mode
    exact_cfg = build_config(overrides=["data.exact=true"], base=cfg)
    t = time.perf_counter()
    source = ExactSource(bench, bb, device, cfg.data.encode_batch_size)
    encode = source._encode
    in_encoder = [0.0, 0]

    def timed_encode(src: Any, transform: Any, seed: int | None) -> Any:  # how much of the trial is encoding
        t0 = time.perf_counter()
        out = encode(src, transform, seed)
        in_encoder[0] += time.perf_counter() - t0
        in_encoder[1] += len(src)
        return out

    source._encode = timed_encode  # type: ignore[method-assign]
    exact = run_continual(exact_cfg, None, work / "exact", backbone=bb, source=source, log=quiet)
    _sync(device)
    t_exact = time.perf_counter() - t
    print(f"exact trial:   {_fmt(t_exact):>10s}   transfer {exact.summary['transfer']:.1f}  average {exact.summary['average']:.1f}  "
          f"last {exact.summary['last']:.1f}   ({_fmt(in_encoder[0])} of it encoding {in_encoder[1]} images: test once, "
          f"augmented training views every epoch)")

    ratio = t_exact / t_cached
    print(f"\nexact / cached trial time: {ratio:.1f}x   (one encoding = {t_encode / t_cached:.1f} cached trials = {t_encode / t_exact:.2f} exact trials)")
    saved = t_exact - t_cached
    if saved > 0:
        print(f"break-even: the cache pays for itself from {t_encode / saved:.2f} trials on")
    print("\nsweep of N trials (one process, trials one after another):")
    print(f"  {'N':>5s}  {'exact: N x trial':>18s}  {'cached: encode + N x trial':>28s}  {'speed-up':>8s}")
    for n in trials:
        ex, ca = n * t_exact, t_encode + n * t_cached
        print(f"  {n:>5d}  {_fmt(ex):>18s}  {_fmt(ca):>28s}  {ex / ca:7.1f}x")
    print(f"\n  asymptotically (N large): {ratio:.1f}x")
    if args.cache_root is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Feature-cache extraction at scale: images/s and peak RSS at several dataset sizes, and whether
opening the cache (``load_bundle``) copies it.

Each size runs in a fresh child process (so peak RSS is that build's own): a synthetic benchmark of N
random small images (one task, 100 classes) is encoded with the tiny random-init model into a fresh
cache. Peak RSS is sampled every 20 ms with psutil (and cross-checked with ``ru_maxrss``). Then a
last child opens the largest cache with ``load_bundle`` and prints RSS before and after, and after
reading every array once (the pages it touches are file-backed and shared, not a private copy).

    python bench/cache_scale.py                       # 10,000 and 50,000 images, CPU or GPU (auto)
    python bench/cache_scale.py --sizes 10000 50000 100000 --views 1 --device cuda --batch-size 512
    python bench/cache_scale.py --source array        # ArrayImages (pixels held in memory) instead

``--source lazy`` (default) draws image i from a seeded generator on demand, so the input data takes
no memory and any RSS growth would be the cache pipeline's; ``--source array`` holds the pixels in an
:class:`~lada_core.benchmarks.base.ArrayImages` (N x 16 x 16 x 3 bytes, reported as ``input MB``).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = 100
TEST_IMAGES = 1000


class SyntheticImages:
    """``n`` random RGB images of ``size`` x ``size``, image ``i`` drawn on demand from seed (seed, i)."""

    def __init__(self, n: int, size: int, seed: int) -> None:
        self.n, self.size, self.seed = n, size, seed
        self.labels = np.arange(n, dtype=np.int64) % CLASSES

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> Any:
        from PIL import Image

        rng = np.random.default_rng((self.seed, index))
        return Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8))

    def fingerprint(self) -> str:
        return f"synthetic-{self.n}-{self.size}-{self.seed}"


def synthetic_benchmark(n: int, source: str, size: int, augment: bool) -> tuple[Any, int]:
    """(benchmark, bytes of input pixels held in memory)."""
    from lada_core.benchmarks.base import ArrayImages, Benchmark, Task

    names = [f"class {c}" for c in range(CLASSES)]
    if source == "lazy":
        train, test = SyntheticImages(n, size, 0), SyntheticImages(TEST_IMAGES, size, 1)
        held = 0
    else:
        rng = np.random.default_rng(0)
        pix = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        tpix = rng.integers(0, 256, (TEST_IMAGES, size, size, 3), dtype=np.uint8)
        train = ArrayImages(pix, np.arange(n) % CLASSES, origin=f"bench-{n}")
        test = ArrayImages(tpix, np.arange(TEST_IMAGES) % CLASSES, origin=f"bench-test-{n}")
        held = pix.nbytes + tpix.nbytes
    return Benchmark(f"synthetic-{n}", [Task("synthetic", names, train, test, epochs=1, augment=augment)]), held


class PeakRSS:
    """Samples this process's RSS in a thread (psutil); ``peak`` in bytes."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def rss_parts() -> dict[str, float]:
    """RSS split as the kernel reports it (MB): anonymous (private copies) and file-backed (maps)."""
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(val.split()[0]) / 1024
    return out


def child_build(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lada_core.backbone import load_backbone, resolve_device
    from lada_core.features.cache import build_cache

    device = resolve_device(args.device)
    bb = load_backbone("lada-tiny", None, device="cpu")
    bench, held = synthetic_benchmark(args.n, args.source, args.image_size, args.views > 0)
    rss0 = rss_parts()
    with PeakRSS() as peak:
        t0 = time.time()
        info = build_cache(
            bench, "lada-tiny", None, args.cache_root, views=args.views, shard_rows=args.shard_rows,
            batch_size=args.batch_size, device=str(device), backbone=bb, progress=False, num_workers=args.workers,
            log=lambda m: None,
        )
        secs = time.time() - t0
    rows = args.n * (1 + args.views) + TEST_IMAGES
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    return {
        "images": args.n, "rows": rows, "seconds": secs, "rows_per_s": rows / secs, "device": str(device),
        "threads": torch.get_num_threads(), "rss_before_mb": rss0["VmRSS"], "peak_rss_mb": peak.peak / 2**20,
        "maxrss_mb": maxrss, "input_mb": held / 2**20, "cache": str(info.path),
        "cache_mb": sum(p.stat().st_size for p in Path(info.path).rglob("*.npy")) / 2**20,
    }


class WideEncoder:
    """A stand-in for a big CLIP: a fixed random linear map of the pixels to ``dim`` features, so that a
    cache of realistic width (ViT-B/16: 512; here 2048) is quick to build for the load check."""

    transform_desc = "bench-wide-linear"

    def __init__(self, dim: int, size: int) -> None:
        import torch

        self.embed_dim = dim
        self.proj = torch.randn(3 * size * size, dim, generator=torch.Generator().manual_seed(0)) / (3 * size * size) ** 0.5
        self.model = self

    def encode_image(self, pixels: Any) -> Any:
        return pixels.flatten(1) @ self.proj

    def to(self, device: Any) -> WideEncoder:
        return self

    @staticmethod
    def transform(img: Any) -> Any:
        import torch

        return torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)

    train_transform = test_transform = plain_transform = transform


def child_wide(args: argparse.Namespace) -> dict[str, Any]:
    from lada_core.features.cache import build_cache

    bench, _ = synthetic_benchmark(args.n, "lazy", args.image_size, False)
    enc = WideEncoder(args.load_dim, args.image_size)
    rss0 = rss_parts()
    with PeakRSS() as peak:
        t0 = time.time()
        info = build_cache(bench, "bench-wide", None, args.cache_root, views=0, shard_rows=args.shard_rows, batch_size=args.batch_size,
                           device="cpu", backbone=enc, progress=False, log=lambda m: None)
        secs = time.time() - t0
    return {"cache": str(info.path), "seconds": secs, "rss_before_mb": rss0["VmRSS"], "peak_rss_mb": peak.peak / 2**20,
            "cache_mb": sum(p.stat().st_size for p in Path(info.path).rglob("*.npy")) / 2**20}


def child_load(args: argparse.Namespace) -> dict[str, Any]:
    from lada_core.features import load_bundle

    before = rss_parts()
    bundle = load_bundle(args.cache)
    after = rss_parts()
    t = bundle.tasks[0]
    mapped = all(isinstance(a, np.memmap) and not a.flags.owndata for a in (t.train, t.test))
    total = 0.0
    for task in bundle.tasks:  # read every byte once
        for arr in (task.train, task.test):
            flat = arr.reshape(-1, arr.shape[-1])
            for s in range(0, flat.shape[0], 65536):
                total += float(np.asarray(flat[s : s + 65536], dtype=np.float32).sum())
    touched = rss_parts()
    return {"bundle_mb": bundle.nbytes() / 2**20, "memmap": mapped, "before": before, "after_load": after, "after_reading_all": touched}


def run_child(argv: list[str]) -> dict[str, Any]:
    r = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit(f"child {' '.join(argv)} failed with exit code {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _print_load(what: str, ld: dict[str, Any]) -> None:
    b, a, t = ld["before"], ld["after_load"], ld["after_reading_all"]
    print(f"load_bundle of {what} ({ld['bundle_mb']:.1f} MB of features), np.memmap={ld['memmap']}: RSS {b['VmRSS']:.0f} -> "
          f"{a['VmRSS']:.0f} MB ({a['VmRSS'] - b['VmRSS']:+.1f} MB); after reading every array once: private (anon) "
          f"{t['RssAnon'] - b['RssAnon']:+.1f} MB, file-backed shared page cache {t['RssFile'] - b['RssFile']:+.1f} MB", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000], help="dataset sizes (training images)")
    p.add_argument("--views", type=int, default=0, help="augmented views per image (0: the test-transform view only)")
    p.add_argument("--source", choices=["lazy", "array"], default="lazy", help="images drawn on demand, or held in an ArrayImages")
    p.add_argument("--image-size", type=int, default=16, help="side of the synthetic images (the tiny model resizes to 32)")
    p.add_argument("--shard-rows", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default="auto")
    p.add_argument("--load-dim", type=int, default=2048, help="feature width of the cache used for the load check (a linear stand-in encoder)")
    p.add_argument("--keep", metavar="DIR", help="build the caches under DIR and keep them (default: a temporary folder, removed)")
    p.add_argument("--child", choices=["build", "wide", "load"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cache-root", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child == "build":
        print(json.dumps(child_build(args)))
        return 0
    if args.child == "wide":
        print(json.dumps(child_wide(args)))
        return 0
    if args.child == "load":
        print(json.dumps(child_load(args)))
        return 0

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cache_scale_"))
    common = ["--views", str(args.views), "--source", args.source, "--image-size", str(args.image_size), "--shard-rows", str(args.shard_rows),
              "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", args.device]
    print(f"cache_scale: tiny model, {args.source} synthetic images {args.image_size}x{args.image_size}, views={args.views}, "
          f"shard_rows={args.shard_rows}, batch_size={args.batch_size}, workers={args.workers}; one child process per size", flush=True)
    header = f"{'images':>8} {'rows':>8} {'device':>6} {'thr':>3} {'seconds':>8} {'rows/s':>8} {'RSS before':>10} {'peak RSS':>9} {'maxrss':>8} {'input':>7} {'arrays':>8}"
    print(header)
    results = []
    try:
        for n in args.sizes:
            r = run_child(["--child", "build", "--n", str(n), "--cache-root", str(work / f"n{n}"), *common])
            results.append(r)
            print(f"{r['images']:>8} {r['rows']:>8} {r['device']:>6} {r['threads']:>3} {r['seconds']:>8.1f} {r['rows_per_s']:>8.0f} "
                  f"{r['rss_before_mb']:>8.0f}MB {r['peak_rss_mb']:>7.0f}MB {r['maxrss_mb']:>6.0f}MB {r['input_mb']:>5.0f}MB {r['cache_mb']:>6.1f}MB", flush=True)
        if len(results) > 1:
            lo, hi = results[0], results[-1]
            growth = hi["peak_rss_mb"] - lo["peak_rss_mb"]
            print(f"peak RSS growth from {lo['images']} to {hi['images']} images: {growth:+.0f} MB "
                  f"(input pixels held: {hi['input_mb'] - lo['input_mb']:+.0f} MB; feature arrays written: {hi['cache_mb'] - lo['cache_mb']:+.1f} MB)")
        big = results[-1]
        ld = run_child(["--child", "load", "--cache", big["cache"]])
        _print_load(f"the {big['images']}-image tiny-model cache", ld)
        n = max(args.sizes)
        w = run_child(["--child", "wide", "--n", str(n), "--cache-root", str(work / "wide"), "--load-dim", str(args.load_dim), *common])
        print(f"wide cache ({n} images x {args.load_dim} features, linear stand-in encoder, lazy images): {w['cache_mb']:.0f} MB of arrays "
              f"built in {w['seconds']:.1f}s, RSS {w['rss_before_mb']:.0f} MB before, peak {w['peak_rss_mb']:.0f} MB")
        _print_load("the wide cache", run_child(["--child", "load", "--cache", w["cache"]]))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

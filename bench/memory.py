"""Peak memory of a node running 1 and then 2 concurrent trials on the same feature cache.

The cache is a set of ``.npy`` files that every trial opens memory-mapped (``lada_core.features.
load_bundle``): their pages live once in the page cache, shared by all the processes of the node that
map them. This script runs ``lada-sweep`` (a real local Ray) with 1 trial and then 2 concurrent trials
of the same config and samples every process of the sweep with psutil:

- PSS (proportional set size: a shared page counts 1/n in each of the n processes mapping it), so the
  sum over processes is the node's real use; USS (pages only that process holds);
- per process, the mappings of the cache's files: resident bytes, their PSS, and how many of those
  pages no other process maps (with one trial: all of them; they are still the page cache's, not a
  copy in the process).

"Held once" shows as: with 2 trials, the pages of the cache mappings that only one process maps ~0,
and the PSS of the cache mappings summed over the trials equal to (not twice) the resident cache
bytes. A trial also holds, in its own memory, float32 copies of the current task's features for the
epoch (``lada_core.trainer``): that working set is per task, not the cache.

    .venv/bin/python bench/memory.py --model lada-small --shots 400 --views 4  # a 17 MB cache (about 8 min here)
    .venv/bin/python bench/memory.py --shots 64 --views 4                      # lada-tiny, a small cache, faster
    .venv/bin/python bench/memory.py                                           # full-shot, 8 views (long to encode)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


def build_cache(args: argparse.Namespace) -> tuple[Path, float]:
    """Build (or find) the cache in this process; returns its folder and the build time."""
    sys.path.insert(0, str(ROOT))
    from lada_core.config import build_config
    from lada_core.features import ensure_cache

    cfg = build_config(sample=_sets(args, as_dict=True))
    t0 = time.time()
    info = ensure_cache(cfg, progress=False, log=lambda m: print(f"  {m}", flush=True))
    return Path(info.path), time.time() - t0


def _sets(args: argparse.Namespace, as_dict: bool = False) -> Any:
    items = {
        "backbone.model": args.model, "backbone.pretrained": None, "data.benchmark": "mini-tail",
        "data.shots": args.shots, "data.views": args.views, "data.cache_root": args.cache_root,
        "train.device": "cpu", "data.device": "cpu", "optim.epochs": args.epochs, "optim.batch_size": args.batch_size,
    }
    if as_dict:
        return items
    out = []
    for k, v in items.items():
        out += ["--set", f"{k}={'null' if v is None else v}"]
    return out


class Sampler(threading.Thread):
    """Samples the memory of a process tree every ``interval`` seconds; keeps the peaks."""

    def __init__(self, root_pid: int, cache: Path, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.cache, self.interval = root_pid, str(cache), interval
        self.stop = threading.Event()
        self.peak_total_pss = 0
        self.peak_trials_pss = 0
        self.peak_at: dict[str, Any] = {}
        self.workers: dict[int, dict[str, float]] = {}

    def sample(self) -> None:
        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = trials = 0
        cache_rows = []
        for p in procs:
            try:
                full = p.memory_full_info()
                maps = [m for m in p.memory_maps(grouped=True) if m.path.startswith(self.cache)]
            except psutil.Error:
                continue
            total += full.pss
            if maps and p.pid != self.root_pid:  # a trial worker: it maps the cache
                trials += full.pss
                c_rss = sum(m.rss for m in maps)
                c_pss = sum(m.pss for m in maps)
                c_private = sum(m.private_clean + m.private_dirty for m in maps)
                w = self.workers.setdefault(p.pid, {"uss": 0, "pss": 0, "cache_rss": 0, "cache_private": 0})
                w["uss"] = max(w["uss"], full.uss)
                w["pss"] = max(w["pss"], full.pss)
                w["cache_rss"] = max(w["cache_rss"], c_rss)
                w["cache_private"] = max(w["cache_private"], c_private)
                cache_rows.append((p.pid, c_rss, c_pss, c_private))
        self.peak_total_pss = max(self.peak_total_pss, total)
        if trials > self.peak_trials_pss:
            self.peak_trials_pss = trials
        if len(cache_rows) >= len(self.peak_at.get("cache", [])) and cache_rows:
            rss_now = sum(r[1] for r in cache_rows)
            if rss_now >= self.peak_at.get("cache_rss", 0) or len(cache_rows) > len(self.peak_at.get("cache", [])):
                self.peak_at = {"cache": cache_rows, "cache_rss": rss_now}

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)


def run(args: argparse.Namespace, work: Path, trials: int, cache: Path) -> Sampler:
    name = f"mem{trials}"
    cmd = [sys.executable, "-m", "sweeps.run", "--space", "lada_paper", "--name", name, "--num-samples", str(trials),
           "--local-cpus", str(max(2, trials)), "--cpus-per-trial", "1", "--max-concurrent", str(trials),
           "--storage", str(work / "results"), "--mlflow-uri", f"sqlite:///{work / 'mlflow.db'}", "--verbose", "0",
           "--time-budget-s", "3600", *_sets(args)]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    sampler = Sampler(proc.pid, cache)
    sampler.start()
    out, err = proc.communicate()
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"the sweep failed ({proc.returncode}):\n{err[-4000:]}")
    return sampler


def show(label: str, s: Sampler, cache_bytes: int) -> None:
    print(f"\n== {label} ==")
    print(f"peak PSS of the whole sweep (driver, Ray, workers): {s.peak_total_pss / MB:8.1f} MB")
    print(f"peak PSS of the trial workers:                      {s.peak_trials_pss / MB:8.1f} MB")
    for pid, w in sorted(s.workers.items()):
        print(f"  worker {pid}: peak USS {w['uss'] / MB:7.1f} MB, PSS {w['pss'] / MB:7.1f} MB; cache mapped and resident "
              f"up to {w['cache_rss'] / MB:6.1f} MB")
    rows = s.peak_at.get("cache", [])
    if rows:
        for pid, c_rss, c_pss, c_private in rows:
            print(f"  at the peak, worker {pid}: cache resident {c_rss / MB:6.1f} MB, its PSS of it {c_pss / MB:6.1f} MB, "
                  f"pages no other process maps {c_private / MB:6.2f} MB")
        rss = sum(r[1] for r in rows)
        pss = sum(r[2] for r in rows)
        print(f"at the moment most of the cache was resident: {len(rows)} trial processes map {rss / MB:.1f} MB of it in all, "
              f"their PSS of it sums to {pss / MB:.1f} MB (cache on disk: {cache_bytes / MB:.1f} MB) -> "
              f"{'held once' if pss <= 1.1 * max(r[1] for r in rows) else 'held more than once'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="lada-tiny", help="the random-init model the cache is encoded with")
    p.add_argument("--shots", type=int, default=None, help="shots per class (default: all training images)")
    p.add_argument("--views", type=int, default=8, help="augmented views per training image in the cache")
    p.add_argument("--epochs", type=int, default=1, help="epochs per task")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--cache-root", default=str(Path(tempfile.gettempdir()) / "lada-bench-cache"), help="kept between runs")
    args = p.parse_args(argv)
    cache, secs = build_cache(args)
    cache_bytes = sum(f.stat().st_size for f in cache.rglob("*.npy"))
    print(f"feature cache {cache}: {cache_bytes / MB:.1f} MB of .npy files (built or verified in {secs:.1f} s)")
    work = Path(tempfile.mkdtemp(prefix="lada-memory-"))
    try:
        one = run(args, work, 1, cache)
        show("1 trial", one, cache_bytes)
        two = run(args, work, 2, cache)
        show("2 concurrent trials", two, cache_bytes)
        print(f"\nnode peak PSS: {one.peak_total_pss / MB:.1f} MB with 1 trial, {two.peak_total_pss / MB:.1f} MB with 2 "
              f"(+{(two.peak_total_pss - one.peak_total_pss) / MB:.1f} MB for the second trial; the cache is {cache_bytes / MB:.1f} MB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

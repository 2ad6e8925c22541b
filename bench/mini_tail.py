"""Time to build the ``mini-tail`` cache and to train it, and Transfer / Average / Last of the full
method and of the paper's ablations (text adapter only, + replay, + memory units, full).

    python bench/mini_tail.py                       # the mini CLIP, 16-shot, the paper's settings
    python bench/mini_tail.py --show-matrix --set lada.distill_weight=16

The model is the project's own offline-pretrained mini CLIP (``lada-mini`` + ``lada-offline``,
pretrained on first use: about two minutes on 2 cores). Its zero-shot accuracy per task (the X-TAIL
rule over all 60 class names, before the first task) is printed first; every variant then trains with
the benchmark's per-task schedule and the paper's hyperparameters.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULTS = [
    "backbone.model=lada-mini",
    "backbone.pretrained=lada-offline",
    "data.benchmark=mini-tail",
    "data.shots=16",
    "data.views=0",
    "train.device=cpu",
    "data.device=cpu",
]
VARIANTS = ["adapter_only", "adapter_replay", "adapter_units", "full"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="extra settings")
    p.add_argument("--cache-root", help="cache folder (default: a fresh temporary one, so the build is timed)")
    p.add_argument("--show-matrix", action="store_true", help="print each accuracy matrix")
    args = p.parse_args(argv)

    from lada_core.backbone import load_backbone
    from lada_core.benchmarks import get_benchmark
    from lada_core.config import build_config
    from lada_core.features import ensure_cache, load_bundle
    from lada_core.mini_clip import zero_shot
    from lada_core.trainer import run_continual

    tmp = Path(tempfile.mkdtemp(prefix="lada-bench-"))
    cache_root = args.cache_root or str(tmp / "cache")
    cfg = build_config(overrides=[*DEFAULTS, f"data.cache_root={cache_root}", *args.overrides])
    bb = load_backbone(cfg.backbone.model, cfg.backbone.pretrained, model_config_dir=cfg.backbone.model_config_dir)
    t0 = time.perf_counter()
    info = ensure_cache(cfg, progress=False, backbone=bb, log=lambda m: None)
    t_cache = time.perf_counter() - t0
    bundle = load_bundle(info.path)
    n_img = sum(t.train.shape[0] * t.train.shape[1] + t.test.shape[0] for t in bundle.tasks)
    print(f"cache: {'reused' if info.reused else 'built'} in {t_cache:.1f}s ({n_img} encoded views, key {info.key})")
    print(f"settings: {' '.join(DEFAULTS[3:] + args.overrides)}")
    bench = get_benchmark(cfg.data.benchmark, cfg.data.data_root, cfg.data.shots, cfg.data.sample_seed)
    zs = zero_shot(bb, bench, template=cfg.backbone.template)
    chance = 100.0 / len(bench.class_names)
    print(f"zero-shot before the first task (chance {chance:.1f}): " + " ".join(f"{k} {v:.1f}" for k, v in zs.items()))
    print(f"{'variant':<16}{'train s':>9}{'Transfer':>10}{'Average':>10}{'Last':>8}{'diag':>8}")
    np.set_printoptions(precision=1, suppress=True, linewidth=160)
    try:
        for v in VARIANTS:
            vcfg = build_config(overrides=[f"lada.variant={v}"], base=cfg)
            t0 = time.perf_counter()
            r = run_continual(vcfg, bundle, tmp / v, backbone=bb, log=lambda m: None)
            dt = time.perf_counter() - t0
            s = r.summary
            diag = float(np.diag(r.matrix).mean())
            print(f"{v:<16}{dt:>9.1f}{s['transfer']:>10.2f}{s['average']:>10.2f}{s['last']:>8.2f}{diag:>8.2f}")
            if args.show_matrix:
                print("  " + " ".join(f"{n:>8}" for n in r.task_names))
                print(r.matrix)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

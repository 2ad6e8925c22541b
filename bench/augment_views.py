"""What the cached mode's pool of augmented views costs in accuracy, and what more views cost on disk.

The authors draw a fresh RandomResizedCrop of every training image every epoch (up to 40 epochs on
Aircraft 16-shot); the cached mode draws one of ``data.views`` pre-encoded crops per image per epoch.
This script trains the same config three ways on mini-tail and prints Transfer / Average / Last:

    cached, views = 10            (the sweeps' former default)
    cached, views = epochs        (as diverse as the authors' crops: one distinct crop per epoch)
    exact                         (the encoder in the loop, a fresh crop every epoch, the authors' way)

then the feature-cache size per view measured on disk, and what X-TAIL 16-shot costs with 10 views
and with as many views as the largest epoch count of an augmented dataset (Aircraft: 40).

    python bench/augment_views.py                                  # tiny random-init model (mechanics only)
    python bench/augment_views.py --set backbone.model=... --set backbone.pretrained=...
    python bench/augment_views.py --seeds 0,1,2                    # mean over training seeds
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULTS = [
    "backbone.model=lada-tiny",
    "backbone.pretrained=null",
    "data.benchmark=mini-tail",
    "data.shots=16",
    "optim.epochs=40",
    "optim.lr=2e-2",
    "lada.distill_weight=8",
    "train.device=cpu",
    "data.device=cpu",
]

# X-TAIL 16-shot (method page, section 7): classes of the datasets trained with augmentation, and
# the largest epoch count among them (Aircraft); MNIST and EuroSAT (20 classes) have no augmentation.
XTAIL_AUGMENTED_CLASSES = 1100 - 10 - 10
XTAIL_PLAIN_CLASSES = 20
XTAIL_MAX_AUGMENTED_EPOCHS = 40


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def train_rows(bundle: Any) -> int:
    return int(sum(t.train.shape[0] * t.train.shape[1] for t in bundle.tasks))


def run(cfg: Any, bb: Any, work: Path, seeds: list[int], exact: bool = False) -> tuple[dict[str, float], float]:
    """Mean Transfer / Average / Last over ``seeds`` and the mean seconds per run."""
    from lada_core.benchmarks import benchmark_for
    from lada_core.config import build_config
    from lada_core.features import ensure_cache, load_bundle
    from lada_core.features.source import ExactSource
    from lada_core.trainer import run_continual

    sums: dict[str, list[float]] = {"transfer": [], "average": [], "last": []}
    seconds = []
    bundle = bench = None
    if exact:
        bench = benchmark_for(cfg.data)
    else:
        bundle = load_bundle(ensure_cache(cfg, progress=False, backbone=bb, log=lambda m: None).path)
    for seed in seeds:
        scfg = build_config(overrides=[f"train.seed={seed}", *(["data.exact=true"] if exact else [])], base=cfg)
        # exact: a fresh source per run, so that each run pays its own encoding, as an exact trial does
        source = ExactSource(bench, bb, torch.device("cpu"), cfg.data.encode_batch_size) if bench is not None else None
        t0 = time.perf_counter()
        r = run_continual(scfg, bundle, work / f"{'exact' if exact else cfg.data.views}-{seed}", backbone=bb, source=source, log=lambda m: None)
        seconds.append(time.perf_counter() - t0)
        for k in sums:
            sums[k].append(r.summary[k])
    return {k: float(np.mean(v)) for k, v in sums.items()}, float(np.mean(seconds))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/augment_views.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="extra settings (repeatable)")
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated (default 0)")
    p.add_argument("--few-views", type=int, default=10, help="the small pool (default 10)")
    p.add_argument("--no-exact", action="store_true", help="skip the exact run (the slowest)")
    args = p.parse_args(argv)

    from lada_core.backbone import load_backbone
    from lada_core.config import build_config
    from lada_core.features import ensure_cache, load_bundle

    tmp = Path(tempfile.mkdtemp(prefix="lada-views-"))
    seeds = [int(s) for s in args.seeds.split(",")]
    base = build_config(overrides=[*DEFAULTS, f"data.cache_root={tmp / 'cache'}", *args.overrides])
    bb = load_backbone(base.backbone.model, base.backbone.pretrained, model_config_dir=base.backbone.model_config_dir)
    epochs = base.optim.epochs or 0
    many = max(epochs, args.few_views + 1)
    print(f"mini-tail, {base.backbone.model} ({base.backbone.pretrained or 'random init'}), {epochs} epochs per task, "
          f"seeds {seeds}; settings: {' '.join(DEFAULTS[3:] + args.overrides)}")
    print(f"{'mode':<26}{'s/run':>8}{'Transfer':>10}{'Average':>10}{'Last':>8}")
    try:
        rows: list[tuple[str, dict[str, float], float]] = []
        sizes: dict[int, tuple[int, int]] = {}
        for views in (args.few_views, many):
            cfg = build_config(overrides=[f"data.views={views}"], base=base)
            info = ensure_cache(cfg, progress=False, backbone=bb, log=lambda m: None)
            sizes[views] = (folder_bytes(info.path), train_rows(load_bundle(info.path)))
            res, sec = run(cfg, bb, tmp, seeds)
            rows.append((f"cached, views={views}", res, sec))
            print(f"{rows[-1][0]:<26}{sec:>8.1f}{res['transfer']:>10.2f}{res['average']:>10.2f}{res['last']:>8.2f}", flush=True)
        if not args.no_exact:
            res, sec = run(base, bb, tmp, seeds, exact=True)
            rows.append(("exact (fresh crop/epoch)", res, sec))
            print(f"{rows[-1][0]:<26}{sec:>8.1f}{res['transfer']:>10.2f}{res['average']:>10.2f}{res['last']:>8.2f}")
            ref = res
            for name, r, _ in rows[:-1]:
                gap = {k: r[k] - ref[k] for k in r}
                print(f"  {name} - exact: Transfer {gap['transfer']:+.2f}  Average {gap['average']:+.2f}  Last {gap['last']:+.2f}")

        (b_few, r_few), (b_many, r_many) = sizes[args.few_views], sizes[many]
        per_row = (b_many - b_few) / max(1, r_many - r_few)  # bytes of one more training row (Parquet + .npy)
        print(f"\ncache on disk (mini-tail): views={args.few_views}: {b_few / 2**20:.1f} MiB, views={many}: {b_many / 2**20:.1f} MiB "
              f"({per_row:.0f} B per training row at embed dim {bb.embed_dim})")
        per_row_b16 = per_row * 512 / bb.embed_dim  # the same layout at ViT-B/16's 512 dims
        for v in (10, XTAIL_MAX_AUGMENTED_EPOCHS):
            n = XTAIL_AUGMENTED_CLASSES * 16 * (1 + v) + XTAIL_PLAIN_CLASSES * 16
            print(f"X-TAIL 16-shot training views, views={v}: {n} rows = {n * per_row_b16 / 2**30:.2f} GiB "
                  f"(plus the test split, the same for any view count)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

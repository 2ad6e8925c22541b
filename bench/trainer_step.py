"""Profile of one training step of ``lada_core.trainer.run_continual`` on cached features.

One step = the current task's class prompts through the AdaptFormer-augmented text tower (forward
and backward: the part that cannot be avoided), the LADA and text logits over all seen classes,
Gaussian replay sampling, one weighted cross-entropy, AdamW and OneCycleLR. Everything else (data
gathering, replay sampling, the logits, the optimizer, the scheduler, Python) should be small.

Inputs are synthetic, so no cache is needed: a two-task bundle of random float16 features written
as memory-mapped ``.npy`` files (like the real cache), and a fabricated checkpoint of the first task
(``--old-classes`` classes: their cached text features, ``lambda1`` memory units each, ``lambda2``
Gaussian components each) from which ``run_continual`` resumes, so it trains the second task
(``--classes`` classes) at once. The model is an open_clip architecture with random init.

Two measurements:

1. the real loop: ``run_continual`` runs until ``--warmup + --steps`` optimizer steps have been taken
   (a post-step hook stops it); the mean wall time of the timed steps, synchronised at both ends of
   the window only. ``--baseline`` runs the same for another version of the trainer (a git revision, or a
   folder holding its ``trainer.py``, ``model.py`` and ``evaluate.py``), for before/after figures.
2. a breakdown: each part of the step timed on its own (synchronised, median of ``--repeats``),
   with the shapes of the loop; "rest" = loop step minus the parts (Python, the loss check, ...).

    python bench/trainer_step.py                                  # ViT-B-16, 100 + 500 classes
    python bench/trainer_step.py --model lada-tiny --steps 50
    python bench/trainer_step.py --device cuda --baseline 5eb0f7a --profile
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class _Stop(Exception):
    """Raised by the optimizer hook once the timed window is over."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/trainer_step.py",
        description="Profile one training step of run_continual on (synthetic) cached features.",
    )
    p.add_argument("--model", default="ViT-B-16", help="open_clip architecture, random init (default ViT-B-16; lada-tiny, lada-small, ...)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--classes", type=int, default=100, help="classes of the current task (default 100, e.g. Aircraft in X-TAIL)")
    p.add_argument("--old-classes", type=int, default=500, help="classes of earlier tasks: replay bank and old units (default 500)")
    p.add_argument("--batch", type=int, default=64, help="real images per batch (default 64)")
    p.add_argument("--shots", type=int, default=16, help="training images per class of the current task (default 16)")
    p.add_argument("--views", type=int, default=10, help="augmented views per training image in the synthetic cache (default 10)")
    p.add_argument("--memory-size", type=int, default=16, help="lambda1, memory units per class (default 16)")
    p.add_argument("--components", type=int, default=4, help="lambda2, Gaussian components per class (default 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps of the loop (default 20 on GPU, 3 on CPU for large models, 30 for small ones)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on GPU, 1 on CPU)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per part of the breakdown (default 20 on GPU, 3 on CPU)")
    p.add_argument("--baseline", metavar="REV|DIR", help="also time another version: a git revision (its lada_core/{trainer,model,evaluate}.py), or a folder holding those files")
    p.add_argument("--no-amp", action="store_true", help="no bfloat16 autocast on GPU (optim.amp=false)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators over the timed loop window")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# synthetic inputs


def synthetic_bundle(root: Path, dim: int, old: int, cur: int, shots: int, views: int, seed: int = 0) -> Any:
    """Two tasks ("old", "current") of random float16 features, memory-mapped like the real cache."""
    from lada_core.features.bundle import FeatureBundle, TaskFeatures

    rng = np.random.default_rng(seed)
    tasks = []
    for name, n_cls in (("old", old), ("current", cur)):
        n = n_cls * shots
        centres = rng.normal(size=(n_cls, dim)).astype(np.float32) * 3.0
        labels = np.repeat(np.arange(n_cls), shots)
        pool = centres[labels][:, None, :] + rng.normal(size=(n, views + 1, dim)).astype(np.float32)
        test_labels = np.repeat(np.arange(n_cls), 2)
        test = centres[test_labels] + rng.normal(size=(len(test_labels), dim)).astype(np.float32)
        arrays = {}
        for key, arr in (("train", pool), ("test", test)):
            path = root / f"{name}-{key}.npy"
            np.save(path, arr.astype(np.float16))
            arrays[key] = np.load(path, mmap_mode="r")
        tasks.append(
            TaskFeatures(
                name=name,
                class_names=[f"{name} synthetic class number {j}" for j in range(n_cls)],
                epochs=1,
                augment=True,
                train=arrays["train"],
                train_labels=labels.astype(np.int64),
                test=arrays["test"],
                test_labels=test_labels.astype(np.int64),
            )
        )
    return FeatureBundle("bench-synthetic", root, tasks, "a photo of a {}.", dim, "bench", None)


def write_fake_first_task(out: Path, cfg: Any, bundle: Any, seed: int = 1) -> None:
    """A checkpoint of task 0 as run_continual writes it: text features, units, class map, mixtures."""
    from lada_core.config import config_hash
    from lada_core.model import block_diagonal_map
    from lada_core.trainer import STATE_FILE

    g = torch.Generator().manual_seed(seed)
    t0 = bundle.tasks[0]
    n_old, dim = t0.num_classes, bundle.embed_dim
    lam1, lam2 = cfg.lada.memory_size, cfg.lada.gaussian_components
    centres = torch.from_numpy(np.asarray(t0.clean_train, dtype=np.float32))
    labels = torch.from_numpy(t0.train_labels)
    means = torch.stack([centres[labels == j][:lam2] for j in range(n_old)]).reshape(-1, dim)
    m = means.shape[0]
    state = {
        "task_index": 0,
        "task_name": t0.name,
        "config_hash": config_hash(cfg),
        "data_key": bundle.key,
        "text_seen": F.normalize(torch.randn(n_old, dim, generator=g), dim=-1),
        "units": F.normalize(torch.randn(n_old * lam1, dim, generator=g), dim=-1),
        "class_map": block_diagonal_map([lam1] * n_old),
        "bank": {
            "means": means,
            "variances": torch.rand(m, generator=g) + 0.5,
            "weights": torch.full((m,), 1.0 / lam2),
            "labels": torch.arange(n_old).repeat_interleave(lam2),
        },
        "rows": torch.zeros(1, len(bundle.tasks), dtype=torch.float64),
        "seconds": 0.0,
    }
    d = out / "task-000"
    d.mkdir(parents=True, exist_ok=True)
    torch.save(state, d / STATE_FILE)


NOT_COUNTED = "  (for reference, not in the sum: "
BASELINE_FILES = ("model", "evaluate", "trainer")  # loaded in this order; later ones import the earlier


def load_trainer(spec: str) -> tuple[ModuleType, str]:
    """Another version of the trainer, with the ``model.py`` and ``evaluate.py`` of the same version:
    ``spec`` is a git revision, or a folder holding ``trainer.py`` (and optionally the other two)."""
    folder = Path(spec)
    sources: dict[str, str] = {}
    if folder.is_dir():
        for name in BASELINE_FILES:
            if (folder / f"{name}.py").is_file():
                sources[name] = (folder / f"{name}.py").read_text()
        if "trainer" not in sources:
            raise SystemExit(f"trainer_step: --baseline {spec}: no trainer.py in that folder")
        label = str(folder)
    else:
        try:
            for name in BASELINE_FILES:
                sources[name] = subprocess.run(
                    ["git", "show", f"{spec}:lada_core/{name}.py"], cwd=ROOT, capture_output=True, text=True, check=True
                ).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            raise SystemExit(f"trainer_step: --baseline {spec!r} is neither a folder nor a git revision ({exc})") from None
        label = f"git {spec}"
    tmp = Path(tempfile.mkdtemp(prefix="baseline-"))
    mod = None
    for name in BASELINE_FILES:
        if name not in sources:
            continue
        src = sources[name]
        for other in BASELINE_FILES:
            if other in sources:
                src = src.replace(f"from lada_core.{other} import", f"from lada_core._baseline_{other} import")
        path = tmp / f"_baseline_{name}.py"
        path.write_text(src)
        module_spec = importlib.util.spec_from_file_location(f"lada_core._baseline_{name}", path)
        assert module_spec is not None and module_spec.loader is not None
        mod = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = mod  # dataclasses look their module up there
        module_spec.loader.exec_module(mod)
    assert mod is not None
    return mod, label


# --------------------------------------------------------------------------------------------------
# measurement 1: the real loop


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(trainer: ModuleType, cfg: Any, bundle: Any, backbone: Any, work: Path, warmup: int, steps: int, device: torch.device, profile: bool = False) -> dict[str, Any]:
    """Run ``trainer.run_continual`` (resuming at task 1) and time ``steps`` optimizer steps."""
    out = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    write_fake_first_task(out, cfg, bundle)
    marks: dict[str, Any] = {"count": 0}
    prof = None
    t_start = time.perf_counter()

    def hook(opt: Any, args: Any, kwargs: Any) -> None:
        nonlocal prof
        marks["count"] += 1
        c = marks["count"]
        if c == 1:
            marks["first"] = time.perf_counter() - t_start
        if c == warmup:
            _sync(device)
            if profile:
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
                prof = torch.profiler.profile(activities=acts)
                prof.start()
            marks["t0"] = time.perf_counter()
        if c == warmup + steps:
            _sync(device)
            marks["t1"] = time.perf_counter()
            if prof is not None:
                prof.stop()
            raise _Stop

    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(hook)
    try:
        trainer.run_continual(cfg, bundle, out, backbone=backbone, log=lambda m: None)
        raise RuntimeError("the synthetic task ended before the timed window did; raise optim.epochs")
    except _Stop:
        pass
    finally:
        handle.remove()
    res = {"step": (marks["t1"] - marks["t0"]) / steps, "setup": marks["first"], "profile": prof}
    return res


# --------------------------------------------------------------------------------------------------
# measurement 2: the parts, each on its own


def _median_time(fn: Callable[[], Any], repeats: int, device: torch.device, warm: int = 1) -> float:
    for _ in range(warm):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_parts(cfg: Any, bundle: Any, backbone: Any, device: torch.device, repeats: int) -> dict[str, tuple[float, float | None]]:
    """Each part of one step with the loop's shapes, as the current trainer runs them; for the parts
    that changed, also the way the trainer of 5eb0f7a ran them (second value; None if unchanged)."""
    from lada_core.model import (
        AdaptedTextEncoder,
        GaussianBank,
        UnitIndex,
        block_diagonal_map,
        grow_class_map,
        lada_logits,
        training_logits,
    )

    lc, bs = cfg.lada, cfg.optim.batch_size
    amp = cfg.optim.amp and device.type == "cuda"
    t_old, t_cur = bundle.tasks
    n_old, n_cls, dim = t_old.num_classes, t_cur.num_classes, bundle.embed_dim
    g = torch.Generator().manual_seed(0)
    tokens_full = backbone.tokenizer(bundle.prompts()[n_old:]).to(device)
    enc = AdaptedTextEncoder(backbone.text_module, lc.adapter_bottleneck, lc.adapter_residual).to(device)
    tokens = enc.trim(tokens_full)
    enc.train()
    lam1 = min(lc.memory_size, t_cur.train.shape[0] // n_cls)
    old_units = F.normalize(torch.randn(n_old * lc.memory_size, dim, generator=g), dim=-1).to(device)
    units_cur = torch.nn.Parameter(F.normalize(torch.randn(n_cls * lam1, dim, generator=g), dim=-1).to(device))
    old_map = block_diagonal_map([lc.memory_size] * n_old).to(device)
    cur_map = block_diagonal_map([lam1] * n_cls).to(device)
    class_map = grow_class_map(old_map.cpu(), [lam1] * n_cls).to(device)
    old_index, cur_index = UnitIndex(old_map), UnitIndex(cur_map)
    text_seen = F.normalize(torch.randn(n_old, dim, generator=g), dim=-1).to(device)
    m = n_old * lc.gaussian_components
    bank = GaussianBank(torch.randn(m, dim, generator=g).to(device), (torch.rand(m, generator=g) + 0.5).to(device),
                        torch.full((m,), 1.0 / lc.gaussian_components, device=device), torch.arange(n_old, device=device).repeat_interleave(lc.gaussian_components))
    sigma = bank.variances.clamp_min(0).sqrt().unsqueeze(1)
    w_full = torch.cat([lc.distill_weight * bank.weights, torch.ones(bs, device=device)])
    opt = torch.optim.AdamW([{"params": list(enc.parameters())}, {"params": [units_cur]}], lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.optim.lr, epochs=10_000, steps_per_epoch=1000)
    rng = np.random.default_rng(0)
    gen = torch.Generator(device=device).manual_seed(0)
    n = t_cur.train.shape[0]
    labels_np = t_cur.train_labels
    labels_t = torch.from_numpy(labels_np).to(device) + n_old
    steps = math.ceil(n / bs)
    out: dict[str, tuple[float, float | None]] = {}

    def encoder(fn: Callable[[torch.Tensor], torch.Tensor], tok: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            fn(tok).float().sum().backward()
        return run

    def eager_before(tok: torch.Tensor) -> torch.Tensor:  # 5eb0f7a: all 77 tokens, eager
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            return enc(tok)

    from lada_core.trainer import _text_step

    step_fn = _text_step(enc, tokens, amp, device, print)  # what the trainer runs: a CUDA graph on GPU
    name = f"text encoder fwd + bwd ({tokens.shape[1]} of {tokens_full.shape[1]} tokens{', CUDA graph' if device.type == 'cuda' else ''})"
    out[name] = (_median_time(encoder(step_fn, tokens), repeats, device), _median_time(encoder(eager_before, tokens_full), repeats, device))
    if device.type == "cuda":
        out[f"{NOT_COUNTED}the same, eager)"] = (_median_time(encoder(eager_before, tokens), repeats, device), None)

    def epoch_data() -> tuple[torch.Tensor, torch.Tensor]:  # once per epoch, shown per step
        f = np.asarray(t_cur.train[np.arange(n), rng.integers(1, t_cur.train.shape[1], size=n)])
        perm = rng.permutation(n)
        return torch.from_numpy(np.asarray(f, dtype=np.float32)).to(device), torch.from_numpy(perm).to(device)

    f_np = np.asarray(t_cur.train[:, 1])
    perm_np = rng.permutation(n)

    def batch_before() -> None:
        idx = perm_np[:bs]
        torch.from_numpy(np.asarray(f_np[idx], dtype=np.float32)).to(device)
        labels_t[torch.from_numpy(idx).to(device)]
        torch.ones(len(idx), device=device)

    out["data: one view per image (per epoch / steps)"] = (_median_time(epoch_data, repeats, device) / steps, None)
    feats_t, perm_t = epoch_data()

    def batch_data() -> tuple[torch.Tensor, torch.Tensor]:
        idx = perm_t[:bs]
        return feats_t[idx], labels_t[idx]

    out["data: batch from the epoch's features"] = (_median_time(batch_data, repeats, device), _median_time(batch_before, repeats, device))
    x_real, y_real = batch_data()

    def replay() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        eps = torch.randn(bank.means.shape, generator=gen, device=device)
        x = F.normalize(torch.cat([bank.means + sigma * eps, x_real]), dim=-1)
        return x, torch.cat([bank.labels, y_real]), w_full[: m + bs]

    out["replay sampling + batch assembly"] = (_median_time(replay, repeats, device), None)
    x, y, w = replay()
    text_cur = F.normalize(torch.randn(n_cls, dim, device=device), dim=-1).requires_grad_(True)

    def logits_loss() -> None:
        z = training_logits(x, text_cur, lc.tau, lc.alpha, lada_logits(x, units_cur, cur_map, lc.beta, cur_index))
        with torch.no_grad():
            z_old = training_logits(x, text_seen, lc.tau, lc.alpha, lada_logits(x, old_units, old_map, lc.beta, old_index))
        z = torch.cat([z_old, z], dim=1)
        loss = (w * F.cross_entropy(z, y, reduction="none")).sum() / float(x.shape[0])
        loss.backward()

    def logits_before() -> None:  # 5eb0f7a: cat of all units and text, dense product with the class map
        text = torch.cat([text_seen, text_cur])
        h = torch.exp(-lc.beta + lc.beta * (x @ torch.cat([old_units, units_cur]).t())) @ class_map
        z = training_logits(x, text, lc.tau, lc.alpha, h)
        loss = (w * F.cross_entropy(z, y, reduction="none")).sum() / float(x.shape[0])
        loss.backward()

    out["LADA + text logits, weighted CE (fwd + bwd)"] = (_median_time(logits_loss, repeats, device), _median_time(logits_before, repeats, device))

    def optim_step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=False)

    for p in list(enc.parameters()) + [units_cur]:
        p.grad = torch.zeros_like(p)
    out["AdamW step + zero_grad"] = (_median_time(optim_step, repeats, device), None)
    out["OneCycleLR step"] = (_median_time(sched.step, repeats, device), None)
    return out


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lada_core import trainer as current_trainer
    from lada_core.backbone import load_backbone, resolve_device
    from lada_core.config import build_config

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    work = Path(tempfile.mkdtemp(prefix="trainer-step-"))
    cfg = build_config(
        overrides=[
            f"backbone.model={args.model}",
            "backbone.pretrained=null",
            f"data.cache_root={work / 'cache'}",
            f"optim.batch_size={args.batch}",
            "optim.epochs=100000",
            f"optim.amp={'false' if args.no_amp else 'true'}",
            f"lada.memory_size={args.memory_size}",
            f"lada.gaussian_components={args.components}",
            f"train.device={device}",
        ]
    )
    t = time.perf_counter()
    backbone = load_backbone(cfg.backbone.model, None)
    t_load = time.perf_counter() - t
    tm = backbone.text_module
    width, layers = int(tm.transformer.width), len(tm.transformer.resblocks)
    large = width * width * layers > 1e6
    steps = args.steps or (20 if gpu else (3 if large else 30))
    warmup = args.warmup or (3 if gpu else 1)
    repeats = args.repeats or (20 if gpu else 3)
    bundle = synthetic_bundle(work, backbone.embed_dim, args.old_classes, args.classes, args.shots, args.views)
    n = args.classes * args.shots
    replayed = args.old_classes * args.components
    units = (args.old_classes + args.classes) * min(args.memory_size, args.shots)
    ctx = bundle.tasks[0].train.shape  # noqa: F841 - keeps the memmap alive
    tok_len = int(backbone.tokenizer(bundle.prompts()[:1]).shape[1])
    print(f"trainer_step: model {args.model} (random init; text tower {layers} x {width}, context {tok_len}, embed {backbone.embed_dim}), "
          f"device {device}{' ' + torch.cuda.get_device_name(device) if gpu else ''}, torch threads {torch.get_num_threads()}, "
          f"amp {'bf16' if cfg.optim.amp and gpu else 'off'}")
    print(f"  current task {args.classes} classes x {args.shots} shots ({math.ceil(n / args.batch)} steps/epoch), {args.old_classes} old classes; "
          f"batch {args.batch} real + {replayed} replayed; {units} memory units; model load {t_load:.1f}s")
    print(f"  loop: {warmup} warm-up + {steps} timed steps; parts: median of {repeats}")

    runs: list[tuple[str, dict[str, Any]]] = []
    if args.baseline:
        base_mod, label = load_trainer(args.baseline)
        runs.append((f"before ({label})", time_loop(base_mod, cfg, bundle, backbone, work, warmup, steps, device)))
    runs.append(("after (working tree)" if args.baseline else "current trainer", time_loop(current_trainer, cfg, bundle, backbone, work, warmup, steps, device)))
    profiled = time_loop(current_trainer, cfg, bundle, backbone, work, warmup, steps, device, profile=True) if args.profile else None
    parts = time_parts(cfg, bundle, backbone, device, repeats)

    enc_name = next(k for k in parts if k.startswith("text encoder"))
    enc = parts[enc_name][0]
    print("\none step of run_continual's loop (wall time, mean over the timed steps):")
    for label, r in runs:
        print(f"  {label:<40s} {1e3 * r['step']:10.2f} ms/step   (setup before the first step {r['setup']:.1f}s)")
    if len(runs) == 2:
        b, a = runs[0][1]["step"], runs[1][1]["step"]
        print(f"  speed-up {b / a:.2f}x")
    step = runs[-1][1]["step"]
    print(f"\nbreakdown of one step ({runs[-1][0]}; each part alone, synchronised, median; 'before' = the same part as 5eb0f7a ran it):")
    print(f"  {'part':<52s} {'ms':>10s} {'share':>7s}   {'before ms':>10s}")
    total = 0.0
    for name, (v, before) in parts.items():
        if not name.startswith(NOT_COUNTED):
            total += v
        extra = f"   {1e3 * before:10.3f}" if before is not None else ""
        print(f"  {name:<52s} {1e3 * v:10.3f} {100 * v / step:6.1f}%{extra}")
    rest = step - total
    why = "in the loop the parts overlap; alone, each waits for the GPU" if gpu else "the parts' own timings vary (machine load)"
    note = f" (< 0: {why})" if rest < 0 else ""
    print(f"  {'rest (Python, loss check, copies; loop - parts)':<52s} {1e3 * rest:10.3f} {100 * rest / step:6.1f}%{note}")
    print(f"  {'loop step':<52s} {1e3 * step:10.3f} {100.0:6.1f}%")
    print(f"\ntext encoder forward+backward: {100 * enc / step:.1f}% of the step; everything else: {100 * (1 - enc / step):.1f}%")
    if len(runs) == 2:
        enc_before = parts[enc_name][1] or enc
        b = runs[0][1]["step"]
        print(f"before: text encoder (all {tok_len} tokens) {1e3 * enc_before:.2f} ms = {100 * min(1.0, enc_before / b):.1f}% of {1e3 * b:.2f} ms; "
              f"everything else {1e3 * max(0.0, b - enc_before):.2f} ms -> after {1e3 * max(0.0, step - enc):.2f} ms")
    prof = profiled["profile"] if profiled is not None else None
    if prof is not None:
        key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
        print(f"\ntorch.profiler (a separate run of the current trainer; {1e3 * profiled['step']:.2f} ms/step under the profiler), {steps} steps, top operators by {key}:")
        print(prof.key_averages().table(sort_by=key, row_limit=20))
    return 0


if __name__ == "__main__":
    sys.exit(main())

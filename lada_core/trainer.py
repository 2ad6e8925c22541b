"""``run_continual(cfg, bundle, output_dir, on_task_end)``: LADA over a task sequence.

Per task k (method page, sections 3-5): a fresh text AdaptFormer in every text block; memory units
from per-class k-means (lambda1) grown into the block-diagonal unit-to-class map; one AdamW over the
adapters and the current units, OneCycleLR stepped every batch; each batch = the task's images
(one random cached view each) plus one replayed feature per stored Gaussian component of every old
class (weight gamma * pi); one weighted cross-entropy over ``tau * cos + alpha * LADA``. After the
task: cache the tuned text features, fit the per-class spherical mixtures, freeze the units,
evaluate every dataset over all class names, write a checkpoint, call ``on_task_end``.

A run resumes from the last finished task found in ``output_dir``: each task only depends on the
checkpointed state and on seeds derived from (seed, task index), so a resumed run ends with the same
matrix as an uninterrupted one.

Data-parallel: when ``torch.distributed`` is initialised, every rank takes rows ``rank::world`` of
each batch (replayed and real), losses are normalised by the global batch, and gradients are summed
over ranks before the optimizer step: the update equals the single-process one up to float error.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lada_core import metrics as M
from lada_core.backbone import Backbone, load_backbone, resolve_device
from lada_core.config import Config, config_hash
from lada_core.evaluate import EvalState, accuracy
from lada_core.features.bundle import FeatureBundle
from lada_core.features.source import FeatureSource
from lada_core.model import (
    AdaptedTextEncoder,
    GaussianBank,
    UnitIndex,
    fit_gaussians,
    grow_class_map,
    kmeans_units,
    lada_logits,
    sample_replay,
    training_logits,
    weighted_cross_entropy,
)

STATE_FILE = "state.pt"


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite; the message says at which task, epoch and step."""


class ResumeError(RuntimeError):
    """The output folder holds a run with another configuration."""


class CheckpointError(ResumeError):
    """A checkpoint file that this trainer did not write (or a damaged one): refused, never loaded."""


@dataclass
class TaskEnd:
    task_index: int
    task_name: str
    num_tasks: int
    row: np.ndarray  # [K] accuracy (%) on every dataset after this step
    matrix: np.ndarray  # [task_index + 1, K] rows so far
    metrics: dict[str, float]
    checkpoint_dir: Path
    seconds: float
    resumed: bool = False  # True when the step was loaded from a checkpoint, not trained now
    peek: dict[str, float] = field(default_factory=dict)  # eval.peek_test: test/<metric> of this step (exploration only)


@dataclass
class RunResult:
    matrix: np.ndarray
    task_names: list[str]
    summary: dict[str, float]
    per_dataset: dict[str, dict[str, float]]
    trainable_params: list[int] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _State:
    """What carries over between tasks (all tensors on CPU in checkpoints)."""

    text_seen: torch.Tensor  # [n_seen, D]
    units: torch.Tensor  # [U, D]
    class_map: torch.Tensor  # [U, n_seen]
    bank: GaussianBank
    rows: list[np.ndarray]


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def task_epochs(cfg: Config, default: int) -> int:
    base = cfg.optim.epochs if cfg.optim.epochs is not None else default
    return max(1, int(round(base * cfg.optim.epochs_scale)))


def trainable_count(text_encoder: AdaptedTextEncoder, n_units: int, dim: int) -> int:
    """Parameters in the optimizer for one task: every adapter parameter plus the current units."""
    return sum(p.numel() for p in text_encoder.parameters()) + n_units * dim


def _text_features(enc: AdaptedTextEncoder, tokens: torch.Tensor, use_adapters: bool, chunk: int = 256) -> torch.Tensor:
    outs = [enc(enc.trim(tokens[i : i + chunk]), use_adapters=use_adapters) for i in range(0, len(tokens), chunk)]
    return torch.cat(outs) if outs else torch.zeros(0)


CUDA_GRAPHS = True
"""Run the text encoder's forward and backward as CUDA graphs on GPU (see :class:`_TextStep`)."""


class _TextStep(torch.nn.Module):
    """``enc(tokens)`` under the trainer's autocast: the text-encoder part of a training step.

    On GPU, a step over a few hundred short prompts is bound by the CPU launching ~1000 small kernels
    (12 blocks, forward and backward), not by the GPU. The prompts of a task never change, so the
    forward and backward are captured once per task as CUDA graphs (``make_graphed_callables``) and
    replayed each step: the same kernels on the same shapes, launched at once. Autocast's weight
    cache is off (required for capture; each adapter weight is cast once per forward either way)."""

    def __init__(self, enc: AdaptedTextEncoder, amp: bool, device_type: str) -> None:
        super().__init__()
        self.enc = enc
        self.amp = amp
        self.device_type = device_type

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            return self.enc(tokens)  # [n_cls, D]


def _text_step(enc: AdaptedTextEncoder, tokens: torch.Tensor, amp: bool, device: torch.device, log: Callable[[str], None]) -> Callable[[torch.Tensor], torch.Tensor]:
    step = _TextStep(enc, amp, device.type)
    if device.type != "cuda" or not CUDA_GRAPHS:
        return step
    try:
        with warnings.catch_warnings():
            # capture runs on side streams; torch warns that the adapters' gradient-accumulation
            # nodes were made on another stream, which costs nothing here (checked: same results)
            warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match")
            return torch.cuda.make_graphed_callables(step, (tokens,))  # type: ignore[return-value]
    except Exception as exc:  # an op that cannot be captured: run eagerly
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        log(f"CUDA graph capture of the text encoder failed ({first}); running it eagerly")
        return _TextStep(enc, amp, device.type)


class _LossWatch:
    """Divergence check and running loss of an epoch without a host-device sync per step.

    On CPU each loss is checked at once. On CUDA, the loss is copied to pinned host memory without
    blocking and checked at the next step (or at the end of the epoch), by which time the GPU has
    long computed it: the CPU keeps queueing work instead of waiting for every forward pass. A
    non-finite loss still raises :class:`DivergenceError` naming the step it occurred at, before
    the step after it changes anything."""

    def __init__(self, device: torch.device, describe: Callable[[float, int, int], str]) -> None:
        self.lazy = device.type == "cuda"
        self.describe = describe
        self.total = 0.0
        self.rows = 0
        self.pending: tuple[Any, int, int, int] | None = None
        if self.lazy:
            self.host = torch.empty((), dtype=torch.float32, pin_memory=True)
            self.event = torch.cuda.Event()

    def push(self, loss: torch.Tensor, rows: int, epoch: int, step: int) -> None:
        self.flush()
        if self.lazy:
            self.host.copy_(loss, non_blocking=True)
            self.event.record()
            self.pending = (None, rows, epoch, step)
        else:
            self.pending = (loss, rows, epoch, step)
            self.flush()

    def flush(self) -> None:
        if self.pending is None:
            return
        loss, rows, epoch, step = self.pending
        self.pending = None
        if loss is None:
            self.event.synchronize()
            value = float(self.host)
        else:
            value = float(loss)
        if not math.isfinite(value):
            raise DivergenceError(self.describe(value, epoch, step))
        self.total += value * rows
        self.rows += rows


def _save_checkpoint(out: Path, k: int, task_name: str, st: _State, cfg: Config, seconds: float, data_key: str) -> Path:
    final = out / f"task-{k:03d}"
    tmp = out / f".task-{k:03d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save(
        {
            "task_index": k,
            "task_name": task_name,
            "config_hash": config_hash(cfg),
            "data_key": data_key,
            "text_seen": st.text_seen.cpu(),
            "units": st.units.cpu(),
            "class_map": st.class_map.cpu(),
            "bank": {n: t.cpu() for n, t in st.bank.state().items()},
            "rows": torch.from_numpy(np.stack(st.rows).astype(np.float64)),  # [k + 1, n_tasks]
            "seconds": float(seconds),
        },
        tmp / STATE_FILE,
    )
    (tmp / "row.json").write_text(json.dumps({"task": task_name, "row": st.rows[-1].tolist()}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


CHECKPOINT_TENSORS = ("text_seen", "units", "class_map", "rows")
CHECKPOINT_PLAIN = {"task_index": int, "task_name": str, "config_hash": str, "data_key": str, "seconds": float}
BANK_KEYS = ("means", "variances", "weights", "labels")


def load_checkpoint(path: Path) -> dict:
    """The state of a ``task-NNN`` folder, read with ``torch.load(weights_only=True)``: tensors and
    plain types only, so a checkpoint folder that others can write (a shared results disk) cannot
    run code in the process that resumes from it. Anything else than what :func:`_save_checkpoint`
    writes is refused with :class:`CheckpointError` (one line naming the file)."""
    import pickle

    file = Path(path) / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"refused checkpoint {file}: not one this trainer wrote ({why}); remove its folder") from None
    problem = _checkpoint_problem(state)
    if problem:
        raise CheckpointError(f"refused checkpoint {file}: not one this trainer wrote ({problem}); remove its folder")
    return state


def _checkpoint_problem(state: Any) -> str | None:
    """What makes ``state`` differ from what :func:`_save_checkpoint` writes, or None."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a dict"
    expected = set(CHECKPOINT_TENSORS) | set(CHECKPOINT_PLAIN) | {"bank"}
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)
        return f"keys differ: {', '.join(map(str, odd[:4]))}"
    for key in CHECKPOINT_TENSORS:
        if not isinstance(state[key], torch.Tensor):
            return f"{key} is not a tensor"
    for key, tp in CHECKPOINT_PLAIN.items():
        if not isinstance(state[key], tp):
            return f"{key} is not a {tp.__name__}"
    bank = state["bank"]
    if not isinstance(bank, dict) or set(bank) != set(BANK_KEYS) or not all(isinstance(v, torch.Tensor) for v in bank.values()):
        return "bank is not the four mixture tensors"
    return None


def last_checkpoint(out: Path, cfg: Config, num_tasks: int, data_key: str | None = None) -> tuple[int, dict] | None:
    """The last finished task in ``out`` (its index and state), or None."""
    if not out.is_dir():
        return None
    for k in reversed(range(num_tasks)):
        p = out / f"task-{k:03d}" / STATE_FILE
        if p.is_file():
            state = load_checkpoint(p.parent)  # a foreign or damaged file is refused, never skipped
            if state.get("config_hash") != config_hash(cfg) or (data_key is not None and state.get("data_key") != data_key):
                raise ResumeError(
                    f"{out} holds a run with another configuration or feature cache (task {k}); use a new output folder"
                )
            return k, state
    return None


def run_continual(
    cfg: Config,
    bundle: FeatureBundle | None,
    output_dir: str | Path,
    on_task_end: Callable[[TaskEnd], None] | None = None,
    backbone: Backbone | None = None,
    source: FeatureSource | None = None,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Train LADA over the whole sequence; see the module docstring. ``source`` replaces the cached
    features (exact mode: :class:`lada_core.features.source.ExactSource`)."""
    from lada_core.features.source import CachedSource

    t_run = time.time()
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    rank, world = _dist()
    out = Path(output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    lc = cfg.lada
    if backbone is None:
        backbone = load_backbone(cfg.backbone.model, cfg.backbone.pretrained, device="cpu", model_config_dir=cfg.backbone.model_config_dir)
    backbone.model.to(device)
    if source is None and bundle is None:
        raise ValueError("run_continual needs a feature bundle or a source")
    src: FeatureSource = source if source is not None else CachedSource(bundle)  # type: ignore[arg-type]
    split = cfg.eval.split  # the accuracy matrix is over this split only; the other one is never read
    peek_rows: list[np.ndarray] = []  # eval.peek_test: the test rows of the tasks trained in this call
    names = src.task_names
    n_tasks = len(names)
    offsets = src.offsets
    dim = src.embed_dim
    amp = cfg.optim.amp and device.type == "cuda"

    # Frozen zero-shot text features of ALL class names (unseen classes at inference).
    tokens_all = backbone.tokenizer(src.prompts(cfg.backbone.template)).to(device)
    zs_encoder = AdaptedTextEncoder(backbone.text_module, lc.adapter_bottleneck, lc.adapter_residual).to(device)
    with torch.no_grad():
        text_zs = _text_features(zs_encoder, tokens_all, use_adapters=False)  # [n_all, D]

    st = _State(torch.zeros(0, dim, device=device), torch.zeros(0, dim, device=device), torch.zeros(0, 0, device=device), GaussianBank(), [])
    start = 0
    resumed = last_checkpoint(out, cfg, n_tasks, src.key)
    if resumed is not None:
        k, s = resumed
        st = _State(
            s["text_seen"].to(device), s["units"].to(device), s["class_map"].to(device),
            GaussianBank.from_state({n: t.to(device) for n, t in s["bank"].items()}),
            [r for r in np.asarray(s["rows"])],
        )
        start = k + 1
        log(f"resuming from {out / f'task-{k:03d}'} ({k + 1}/{n_tasks} tasks done)")
        if on_task_end is not None:
            for j in range(start):
                rows = np.stack(st.rows[: j + 1])
                on_task_end(TaskEnd(j, names[j], n_tasks, rows[-1], rows, _step_metrics(rows, names), out / f"task-{j:03d}", 0.0, resumed=True))

    if world > 1:  # every rank must resume at the same task (the output folder must be shared)
        span = torch.tensor([start, -start], device=device)
        torch.distributed.all_reduce(span, op=torch.distributed.ReduceOp.MAX)
        if int(span[0]) != -int(span[1]):
            raise ResumeError(
                f"data-parallel ranks found different finished tasks in {out} (from {-int(span[1])} to {int(span[0])}); "
                "all ranks must see the same output folder"
            )

    counts: list[int] = []
    for k in range(start, n_tasks):
        t_task = time.time()
        n_cls = src.num_classes(k)
        offset = offsets[k]
        tokens = tokens_all[offset : offset + n_cls]
        n_old = offset

        # Fresh adapters (seeded per task) and memory units from k-means on test-transform features.
        torch.manual_seed(cfg.train.seed * 7919 + k)
        enc = AdaptedTextEncoder(backbone.text_module, lc.adapter_bottleneck, lc.adapter_residual).to(device)
        clean = src.clean_train(k)  # [N, D] unnormalised
        labels_np = src.train_labels(k)
        if lc.use_units:
            normed = clean / np.linalg.norm(clean, axis=1, keepdims=True).clip(1e-12)
            centres, per_class = kmeans_units(normed, labels_np, n_cls, lc.memory_size, lc.kmeans_n_init, lc.cluster_seed)
            units_cur = torch.nn.Parameter(torch.from_numpy(centres).to(device))
            class_map = grow_class_map(st.class_map.cpu() if st.class_map.numel() else None, per_class).to(device)
        else:
            units_cur = torch.nn.Parameter(torch.zeros(0, dim, device=device))
            class_map = st.class_map
        groups = [{"params": list(enc.parameters())}]
        if units_cur.numel():
            groups.append({"params": [units_cur]})
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        counts.append(trainable_count(enc, units_cur.shape[0], dim))

        n = len(labels_np)
        bs = cfg.optim.batch_size
        steps = math.ceil(n / bs)
        epochs = task_epochs(cfg, src.epochs(k))
        sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.optim.lr, epochs=epochs, steps_per_epoch=steps)
        rng = np.random.default_rng([cfg.train.seed, k])
        gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 100_003 + k)
        labels_t = torch.from_numpy(labels_np).to(device) + n_old
        replay_on = lc.use_replay and len(st.bank) > 0
        # Constant for the whole task, so computed here and not every step:
        # - the prompts without the padding after their last EOT token (AdaptedTextEncoder.trim);
        # - which units belong to which class (UnitIndex), for the old and for the current units.
        # The old classes' logits need no gradient (their text features and units are frozen), so they
        # are computed apart from the current ones and no torch.cat of the old units is made per step.
        tokens = enc.trim(tokens)
        ones = torch.ones(bs, device=device)  # real images weigh 1
        use_units = lc.use_units
        if use_units:
            cur_units_at = st.units.shape[0]
            cur_map = class_map[cur_units_at:, n_old:]  # [U_k, n_cls]
            cur_index = UnitIndex(cur_map)
            old_map = class_map[:cur_units_at, :n_old]  # [U_old, n_old]
            old_index = UnitIndex(old_map)
        denoms: dict[int, float] = {}  # rows of the global batch -> loss denominator

        def _describe(value: float, epoch: int, step: int, k: int = k) -> str:
            return (
                f"loss is {value} at task {k + 1}/{n_tasks} ({names[k]}), epoch {epoch + 1}, step {step + 1}"
                f" (lr {cfg.optim.lr:g}): training diverged"
            )

        enc.train()
        text_step = _text_step(enc, tokens, amp, device, log)
        for epoch in range(epochs):
            t_ep = time.time()
            feats_epoch = src.epoch_features(k, epoch, rng)  # [N, D] one view per image
            perm = rng.permutation(n)
            feats_t = torch.from_numpy(np.asarray(feats_epoch, dtype=np.float32)).to(device)  # [N, D], once per epoch
            perm_t = torch.from_numpy(perm).to(device)
            watch = _LossWatch(device, _describe)
            for step in range(steps):
                idx = perm_t[step * bs : (step + 1) * bs]
                x_real = feats_t[idx]
                y_real = labels_t[idx]
                if replay_on:
                    # one replayed feature per stored component, fresh noise, weight gamma * pi; in front
                    x_rep, y_rep, w_rep = sample_replay(st.bank, lc.distill_weight, generator=gen)
                    x = torch.cat([x_rep, x_real])
                    y = torch.cat([y_rep, y_real])
                    w = torch.cat([w_rep, ones[: len(x_real)]])
                else:
                    x, y, w = x_real, y_real, ones[: len(x_real)]
                b_global = x.shape[0]
                x = F.normalize(x, dim=-1)
                if b_global not in denoms:
                    denoms[b_global] = float(b_global) if lc.loss_reduction == "mean" else float(w.sum())
                denom = denoms[b_global]
                if world > 1:
                    x, y, w = x[rank::world], y[rank::world], w[rank::world]
                text_cur = text_step(tokens)  # [n_cls, D]
                # z = tau * cos(x, [old text (frozen cache); current text]) + alpha * h(x), old classes first
                h_cur = lada_logits(x, units_cur, cur_map, lc.beta, cur_index) if use_units else None
                z = training_logits(x, text_cur.float(), lc.tau, lc.alpha, h_cur)  # [b, n_cls]
                if n_old:
                    with torch.no_grad():
                        h_old = lada_logits(x, st.units, old_map, lc.beta, old_index) if use_units else None
                        z_old = training_logits(x, st.text_seen, lc.tau, lc.alpha, h_old)  # [b, n_old]
                    z = torch.cat([z_old, z], dim=1)
                loss = weighted_cross_entropy(z, y, w, lc.loss_reduction, denom)
                if world > 1:
                    loss_val = loss.detach().clone()
                    torch.distributed.all_reduce(loss_val)
                else:
                    loss_val = loss.detach()
                watch.push(loss_val, b_global, epoch, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if world > 1:
                    for g in groups:
                        for p in g["params"]:
                            if p.grad is not None:
                                torch.distributed.all_reduce(p.grad)
                optimizer.step()
                sched.step()
            watch.flush()
            if rank == 0:
                log(
                    f"[task {k + 1}/{n_tasks} {names[k]}] epoch {epoch + 1}/{epochs} loss {watch.total / max(1, watch.rows):.4f} "
                    f"lr {sched.get_last_lr()[0]:.2e} {time.time() - t_ep:.1f}s"
                )

        # End of task: cache tuned text features, fit mixtures, freeze units.
        enc.eval()
        with torch.no_grad():
            text_cur = _text_features(enc, tokens, use_adapters=True)
        del enc, text_step, optimizer, sched
        bank = st.bank
        if lc.use_replay:
            new = fit_gaussians(clean.astype(np.float32), labels_np, n_cls, lc.gaussian_components, n_old, lc.cluster_seed)
            bank = _extend_bank(bank, new, device)
        st = _State(
            torch.cat([st.text_seen, text_cur]),
            torch.cat([st.units, units_cur.detach()]) if lc.use_units else st.units,
            class_map if lc.use_units else st.class_map,
            bank,
            st.rows,
        )
        ev = EvalState(st.text_seen, text_zs, st.units if lc.use_units else None, st.class_map if lc.use_units else None, lc.tau, lc.alpha, lc.beta, lc.selector)
        with torch.no_grad():
            row = np.array(
                [accuracy(src.eval_features(t, split), src.eval_labels(t, split), offsets[t], ev, cfg.train.eval_batch_size, device) for t in range(n_tasks)]
            )
        st.rows.append(row)
        peek = _peek_test(cfg, src, ev, offsets, peek_rows, names, device, k) if rank == 0 else {}
        secs = time.time() - t_task
        ckpt = _save_checkpoint(out, k, names[k], st, cfg, secs, src.key) if rank == 0 else out / f"task-{k:03d}"
        if rank == 0:
            log(f"[task {k + 1}/{n_tasks} {names[k]}] done in {secs:.1f}s: " + " ".join(f"{a:.1f}" for a in row))
        if on_task_end is not None:
            rows = np.stack(st.rows)
            on_task_end(TaskEnd(k, names[k], n_tasks, row, rows, _step_metrics(rows, names), ckpt, secs, peek=peek))

    matrix = np.stack(st.rows)
    result = RunResult(matrix, names, M.summarize(matrix), M.per_dataset(matrix, names), counts, time.time() - t_run)
    return result


def _extend_bank(bank: GaussianBank, new: GaussianBank, device: torch.device) -> GaussianBank:
    new = GaussianBank(*(t.to(device) for t in (new.means, new.variances, new.weights, new.labels)))
    return bank.extend(new)


def _peek_test(cfg: Any, src: Any, ev: Any, offsets: list[int], peek_rows: list[np.ndarray], names: list[str], device: torch.device, k: int) -> dict[str, float]:
    """``eval.peek_test`` with ``eval.split=val``: this step's metrics on the test split too, named
    ``test/<metric>`` (for exploration; never what a sweep selects on). A resumed run has no test rows
    of the tasks done before it: it then gives only this step's ``test/acc/<dataset>``."""
    if not cfg.eval.peek_test or cfg.eval.split == "test":
        return {}
    with torch.no_grad():
        row = np.array([accuracy(src.eval_features(t, "test"), src.eval_labels(t, "test"), offsets[t], ev, cfg.train.eval_batch_size, device)
                        for t in range(len(names))])
    peek_rows.append(row)
    metrics = _step_metrics(np.stack(peek_rows), names) if len(peek_rows) == k + 1 else {}
    metrics.pop(M.TASK_INDEX, None)
    metrics.update({f"acc/{n}": float(a) for n, a in zip(names, row)})
    return {f"test/{k}": v for k, v in metrics.items()}


def _step_metrics(rows: np.ndarray, names: list[str]) -> dict[str, float]:
    """partial_summary plus per-dataset accuracy of the current row (``acc/<dataset>``)."""
    out = M.partial_summary(rows)
    for name, a in zip(names, rows[-1]):
        out[f"acc/{name}"] = float(a)
    out[M.TASK_INDEX] = float(rows.shape[0] - 1)
    return out

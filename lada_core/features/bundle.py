"""Cache -> one in-memory :class:`FeatureBundle` (memory-mapped arrays: loading copies nothing).

A bundle holds, per task: the pool of training views ``[N, V+1, D]`` (view 0 = test transform), the
local labels, the features of the evaluation splits it was built with (``val`` and/or ``test``,
``[M, D]``; a split that was not encoded is None), the class names; and for the benchmark: the prompt
template (the zero-shot text inputs are ``template.format(name)`` with ``_`` -> space).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lada_core.features.cache import BUNDLE, MANIFEST, CacheError, CacheInfo, build_cache, quick_check, read_bundle


@dataclass
class TaskFeatures:
    name: str
    class_names: list[str]
    epochs: int
    augment: bool
    train: np.ndarray  # [N, V+1, D] float16 (memory-mapped); view 0 = test transform
    train_labels: np.ndarray  # [N] int, local to the task
    test: np.ndarray | None = None  # [M, D] float16; None when the bundle has no test split
    test_labels: np.ndarray | None = None  # [M]
    val: np.ndarray | None = None  # [M', D] float16; None when the bundle has no val split
    val_labels: np.ndarray | None = None

    def eval_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(features ``[M, D]``, local labels ``[M]``) of ``split`` (``val`` or ``test``)."""
        feats, labels = (self.val, self.val_labels) if split == "val" else (self.test, self.test_labels) if split == "test" else (None, None)
        if feats is None or labels is None:
            raise CacheError(f"the feature bundle holds no {split!r} features for task {self.name} (built without that split)")
        return feats, labels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def clean_train(self) -> np.ndarray:
        """Test-transform features of the training images ``[N, D]`` (k-means and the mixtures)."""
        return self.train[:, 0]


@dataclass
class FeatureBundle:
    key: str
    path: Path | None
    tasks: list[TaskFeatures]
    template: str
    embed_dim: int
    backbone: str = ""
    pretrained: str | None = None

    @property
    def class_names(self) -> list[str]:
        return [c for t in self.tasks for c in t.class_names]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def offsets(self) -> list[int]:
        out, acc = [], 0
        for t in self.tasks:
            out.append(acc)
            acc += t.num_classes
        return out

    def prompts(self) -> list[str]:
        """The zero-shot text inputs over ALL class names, in global label order."""
        return [self.template.format(c.replace("_", " ")) for c in self.class_names]

    def nbytes(self) -> int:
        return int(sum(t.train.nbytes + sum(a.nbytes for a in (t.val, t.test) if a is not None) for t in self.tasks))


def _open_split(root: Path, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per task (features, labels) of one split folder; train features as ``[N, V+1, D]``."""
    m = quick_check(root)
    if m.get("split") != split:
        raise CacheError(f"corrupt feature cache {root / MANIFEST}: holds split {m.get('split')!r}, expected {split!r}")
    out = []
    for t in m["tasks"]:
        s = t[split]
        emb = np.load(root / s["emb"]["file"], mmap_mode="r")
        meta = np.load(root / s["meta"]["file"], mmap_mode="r")
        vps, n = int(s["views_per_sample"]), int(s["samples"])
        if emb.shape[0] != n * vps:
            raise CacheError(f"corrupt cache {root / s['emb']['file']}: {emb.shape[0]} rows for {n} samples x {vps} views")
        labels = np.asarray(meta[::vps, 1], dtype=np.int64)
        out.append((emb.reshape(n, vps, emb.shape[1]) if split == "train" else emb, labels))
    return out


def load_bundle(path: str | Path) -> FeatureBundle:
    """Open a finished bundle (the folder holding ``bundle.json``; ``CacheInfo.path``) and the split
    folders it names, and only those: a bundle built for tuning has no test split and opens no test
    feature. Arrays are memory-mapped read-only (``np.memmap``, nothing is copied): every process of a
    node that opens the same cache shares the same pages (the cache is held once per node). Checks
    :func:`~lada_core.features.cache.quick_check` first (manifest, array headers, shapes, exact file
    sizes): a missing, truncated or incomplete cache raises :class:`CacheError` naming the file.
    Content hashes are checked by ``ensure_cache`` on reuse and by ``lada-cache --check``."""
    root = Path(path)
    b = read_bundle(root)
    arrays = {sp: _open_split(root.parent / key, sp) for sp, key in b["splits"].items()}
    if "train" not in arrays or any(len(v) != len(b["tasks"]) for v in arrays.values()):
        raise CacheError(f"corrupt bundle manifest {root / BUNDLE}: its splits do not match its {len(b['tasks'])} tasks")
    tasks = []
    for i, t in enumerate(b["tasks"]):
        extra: dict[str, Any] = {}
        for sp in ("val", "test"):
            if sp in arrays:
                extra[sp], extra[f"{sp}_labels"] = arrays[sp][i]
        tasks.append(
            TaskFeatures(
                name=t["name"], class_names=list(t["class_names"]), epochs=int(t["epochs"]), augment=bool(t["augment"]),
                train=arrays["train"][i][0], train_labels=arrays["train"][i][1], **extra,
            )
        )
    return FeatureBundle(b["key"], root, tasks, b["template"], int(b["embed_dim"]), b["backbone"], b["pretrained"])


def ensure_cache(cfg: Any, progress: bool = True, run_jobs: Any = None, backbone: Any = None, log: Any = None, verify: bool = True, num_workers: int = 0,
                 splits: Sequence[str] | None = None) -> CacheInfo:
    """Build or find the cache of ``splits`` (default :func:`cache_splits`: train and the
    evaluation split) of the benchmark ``cfg`` (a :class:`lada_core.config.Config`) describes. Only
    those splits are read and encoded. A found split is verified before reuse (array sha256 with
    ``verify``; see :func:`~lada_core.features.cache.build_cache`)."""
    from lada_core.benchmarks import benchmark_for

    bench = benchmark_for(cfg.data)
    return build_cache(
        bench,
        cfg.backbone.model,
        cfg.backbone.pretrained,
        cfg.data.cache_root,
        views=cfg.data.views,
        shard_rows=cfg.data.shard_rows,
        batch_size=cfg.data.encode_batch_size,
        device=cfg.data.device,
        model_config_dir=cfg.backbone.model_config_dir,
        template=cfg.backbone.template,
        seed=cfg.data.sample_seed,
        run_jobs=run_jobs,
        progress=progress,
        backbone=backbone,
        log=log,
        verify=verify,
        num_workers=num_workers,
        splits=tuple(splits) if splits is not None else cache_splits(cfg),
    )


def cache_splits(cfg: Any) -> tuple[str, ...]:
    """The splits a run of ``cfg`` reads: ``train``, the evaluation split (``eval.split``), and test
    too with ``eval.peek_test``."""
    ev = cfg.eval
    return ("train", ev.split) + (("test",) if ev.peek_test and ev.split != "test" else ())


__all__ = ["BUNDLE", "FeatureBundle", "MANIFEST", "TaskFeatures", "cache_splits", "ensure_cache", "load_bundle"]

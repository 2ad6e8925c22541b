"""Cache -> one in-memory :class:`FeatureBundle` (memory-mapped arrays: loading copies nothing).

A bundle holds, per task: the pool of training views ``[N, V+1, D]`` (view 0 = test transform), the
local labels, the test features ``[M, D]``, the class names; and for the benchmark: the prompt
template (the zero-shot text inputs are ``template.format(name)`` with ``_`` -> space).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lada_core.features.cache import MANIFEST, CacheError, CacheInfo, build_cache, quick_check


@dataclass
class TaskFeatures:
    name: str
    class_names: list[str]
    epochs: int
    augment: bool
    train: np.ndarray  # [N, V+1, D] float16 (memory-mapped); view 0 = test transform
    train_labels: np.ndarray  # [N] int, local to the task
    test: np.ndarray  # [M, D] float16
    test_labels: np.ndarray  # [M]

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
        return int(sum(t.train.nbytes + t.test.nbytes for t in self.tasks))


def load_bundle(path: str | Path) -> FeatureBundle:
    """Open a finished cache. Arrays are memory-mapped read-only (``np.memmap``, nothing is copied):
    every process of a node that opens the same cache shares the same pages (the cache is held once
    per node). Checks :func:`~lada_core.features.cache.quick_check` first (manifest, array headers,
    shapes, exact file sizes): a missing, truncated or incomplete cache raises :class:`CacheError`
    naming the file. Content hashes are checked by ``ensure_cache`` on reuse and by ``lada-cache --check``."""
    root = Path(path)
    m = quick_check(root)
    tasks = []
    for t in m["tasks"]:
        arrays: dict[str, Any] = {}
        for split in ("train", "test"):
            s = t[split]
            emb = np.load(root / s["emb"]["file"], mmap_mode="r")
            meta = np.load(root / s["meta"]["file"], mmap_mode="r")
            vps = int(s["views_per_sample"])
            n = int(s["samples"])
            if emb.shape[0] != n * vps:
                raise CacheError(f"corrupt cache {root / s['emb']['file']}: {emb.shape[0]} rows for {n} samples x {vps} views")
            labels = np.asarray(meta[::vps, 1], dtype=np.int64)
            arrays[split] = (emb.reshape(n, vps, emb.shape[1]) if split == "train" else emb, labels)
        tasks.append(
            TaskFeatures(
                name=t["name"],
                class_names=list(t["class_names"]),
                epochs=int(t["epochs"]),
                augment=bool(t["augment"]),
                train=arrays["train"][0],
                train_labels=arrays["train"][1],
                test=arrays["test"][0],
                test_labels=arrays["test"][1],
            )
        )
    return FeatureBundle(m["key"], root, tasks, m["template"], int(m["embed_dim"]), m["backbone"], m["pretrained"])


def ensure_cache(cfg: Any, progress: bool = True, run_jobs: Any = None, backbone: Any = None, log: Any = None, verify: bool = True, num_workers: int = 0) -> CacheInfo:
    """Build or find the cache that ``cfg`` (a :class:`lada_core.config.Config`) describes. A found
    cache is verified before reuse (array sha256 with ``verify``; see :func:`~lada_core.features.cache.build_cache`)."""
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
    )


__all__ = ["FeatureBundle", "TaskFeatures", "load_bundle", "ensure_cache", "MANIFEST"]

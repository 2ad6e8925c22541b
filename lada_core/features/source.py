"""Where the trainer gets its image features from.

:class:`CachedSource` reads the memory-mapped feature cache: each epoch draws one of the cached
augmented views per training image. :class:`ExactSource` runs the frozen image encoder inside the
training loop with fresh augmentation every epoch (the ``data.exact`` switch, ``--no-cache``), so
the accuracy cost of the finite view pool can be measured.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from lada_core.benchmarks.base import Benchmark
from lada_core.features.bundle import FeatureBundle


class FeatureSource(Protocol):
    """What the trainer reads: per task, clean and per-epoch training features, test features."""

    key: str
    task_names: list[str]
    offsets: list[int]
    embed_dim: int

    def prompts(self, template: str) -> list[str]: ...
    def num_classes(self, k: int) -> int: ...
    def epochs(self, k: int) -> int: ...
    def clean_train(self, k: int) -> np.ndarray: ...
    def train_labels(self, k: int) -> np.ndarray: ...
    def epoch_features(self, k: int, epoch: int, rng: np.random.Generator) -> np.ndarray: ...
    def eval_features(self, t: int, split: str) -> np.ndarray: ...
    def eval_labels(self, t: int, split: str) -> np.ndarray: ...


class CachedSource:
    def __init__(self, bundle: FeatureBundle) -> None:
        if bundle is None:
            raise ValueError("a feature bundle is required unless an exact source is given")
        self.bundle = bundle

    key = property(lambda self: self.bundle.key)
    task_names = property(lambda self: self.bundle.task_names)
    offsets = property(lambda self: self.bundle.offsets)
    embed_dim = property(lambda self: self.bundle.embed_dim)

    def prompts(self, template: str) -> list[str]:
        return [template.format(c.replace("_", " ")) for c in self.bundle.class_names]

    def num_classes(self, k: int) -> int:
        return self.bundle.tasks[k].num_classes

    def epochs(self, k: int) -> int:
        return self.bundle.tasks[k].epochs

    def clean_train(self, k: int) -> np.ndarray:
        return np.asarray(self.bundle.tasks[k].clean_train, dtype=np.float32)

    def train_labels(self, k: int) -> np.ndarray:
        return np.asarray(self.bundle.tasks[k].train_labels, dtype=np.int64)

    def epoch_features(self, k: int, epoch: int, rng: np.random.Generator) -> np.ndarray:
        """One view per image: a random augmented view (1..V), or view 0 when none are cached."""
        pool = self.bundle.tasks[k].train  # [N, V+1, D]
        n, vps = pool.shape[0], pool.shape[1]
        if vps == 1:
            return np.asarray(pool[:, 0])
        views = rng.integers(1, vps, size=n)
        return np.asarray(pool[np.arange(n), views])

    def eval_features(self, t: int, split: str) -> np.ndarray:
        """Features of task ``t``'s evaluation split (``val`` or ``test``); only that split is read."""
        return self.bundle.tasks[t].eval_split(split)[0]

    def eval_labels(self, t: int, split: str) -> np.ndarray:
        return self.bundle.tasks[t].eval_split(split)[1]


class ExactSource:
    """Encoder in the loop: fresh augmentation every epoch; clean and test features encoded once."""

    def __init__(self, benchmark: Benchmark, backbone: Any, device: torch.device, batch_size: int = 256, eval_split: str = "test") -> None:
        self.bench = benchmark
        self.backbone = backbone
        self.device = device
        self.batch_size = batch_size
        self._clean: dict[int, np.ndarray] = {}
        self._eval: dict[tuple[int, str], np.ndarray] = {}
        self.splits: tuple[str, ...] = ("train", eval_split)  # the splits whose content names this source (key)

    key = property(lambda self: "exact-" + self.bench.spec_hash(self.splits) + "-" + self.backbone.transform_desc)
    task_names = property(lambda self: self.bench.task_names)
    offsets = property(lambda self: self.bench.offsets)
    embed_dim = property(lambda self: self.backbone.embed_dim)

    def prompts(self, template: str) -> list[str]:
        return [template.format(c.replace("_", " ")) for c in self.bench.class_names]

    def num_classes(self, k: int) -> int:
        return self.bench.tasks[k].num_classes

    def epochs(self, k: int) -> int:
        return self.bench.tasks[k].epochs

    def _encode(self, src: Any, transform: Any, seed: int | None) -> np.ndarray:
        out = []
        self.backbone.model.to(self.device)
        for start in range(0, len(src), self.batch_size):
            imgs = []
            for i in range(start, min(len(src), start + self.batch_size)):
                if seed is not None:
                    torch.manual_seed(seed * 1_000_003 + i)
                imgs.append(transform(src.load(i)))
            pixels = torch.stack(imgs).to(self.device)
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
                out.append(self.backbone.model.encode_image(pixels).float().cpu().numpy())
        return np.concatenate(out)

    def clean_train(self, k: int) -> np.ndarray:
        if k not in self._clean:
            self._clean[k] = self._encode(self.bench.tasks[k].train, self.backbone.test_transform, None)
        return self._clean[k]

    def train_labels(self, k: int) -> np.ndarray:
        return np.asarray(self.bench.tasks[k].train.labels, dtype=np.int64)

    def epoch_features(self, k: int, epoch: int, rng: np.random.Generator) -> np.ndarray:
        task = self.bench.tasks[k]
        if not task.augment:
            return self.clean_train(k)
        return self._encode(task.train, self.backbone.train_transform, int(rng.integers(2**31 - 1)))

    def _split(self, t: int, split: str) -> Any:
        src = self.bench.tasks[t].split(split)
        if src is None or split == "train":
            raise ValueError(f"task {self.bench.tasks[t].name} has no {split!r} evaluation images")
        return src

    def eval_features(self, t: int, split: str) -> np.ndarray:
        if (t, split) not in self._eval:
            self._eval[t, split] = self._encode(self._split(t, split), self.backbone.test_transform, None)
        return self._eval[t, split]

    def eval_labels(self, t: int, split: str) -> np.ndarray:
        return np.asarray(self._split(t, split).labels, dtype=np.int64)

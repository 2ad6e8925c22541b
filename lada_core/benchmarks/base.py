"""Task sequences as data.

A :class:`Benchmark` is an ordered list of :class:`Task` objects. Each task is one dataset (X-TAIL) or
one domain (``mini-tail``) with its own class names; label spaces are disjoint and every
class gets a *global* index = the task's offset + its local label. Images are read lazily through an
:class:`ImageSource`, so building a benchmark is cheap and only the cache extraction touches pixels.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class DataError(ValueError):
    """Missing or malformed data on disk; the message names the file or folder."""


class ImageSource(Protocol):
    """Random access to the images of one split; ``labels`` are the task's local labels."""

    @property
    def labels(self) -> np.ndarray:  # [N] int64, local to the task
        ...

    def __len__(self) -> int: ...

    def load(self, index: int) -> Any:  # -> PIL.Image.Image (RGB)
        ...

    def fingerprint(self) -> str:
        """A short string that changes when the content changes (used in the cache key)."""
        ...


@dataclass
class ArrayImages:
    """Images held in memory as a uint8 array ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` (RGB)."""

    pixels: np.ndarray
    labels: np.ndarray
    ids: Sequence[str] | None = None
    origin: str = ""  # what the pixels were read from, for the fingerprint

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def load(self, index: int) -> Any:
        from PIL import Image

        arr = self.pixels[index]
        img = Image.fromarray(arr)
        return img.convert("RGB")

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.origin.encode())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        h.update(str(self.pixels.shape).encode())
        # Hashing all pixels is cheap for the small in-memory datasets this class serves.
        h.update(np.ascontiguousarray(self.pixels).tobytes())
        return h.hexdigest()[:16]


@dataclass
class FileImages:
    """Images stored as files; ``paths`` are relative to ``root``."""

    root: Path
    paths: Sequence[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Any:
        from PIL import Image, UnidentifiedImageError

        path = Path(self.root) / self.paths[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"image not found: {path}") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise DataError(f"unreadable image {path}: {exc}") from None

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(str(Path(self.root).resolve()).encode())
        for p, y in zip(self.paths, self.labels.tolist()):
            h.update(f"{p}\t{y}\n".encode())
        return h.hexdigest()[:16]


@dataclass
class Subset:
    """A view of another source restricted to ``indices`` (few-shot sampling, label slices)."""

    base: ImageSource
    indices: np.ndarray
    label_map: Callable[[np.ndarray], np.ndarray] | None = None
    labels: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        raw = np.asarray(self.base.labels)[self.indices]
        self.labels = (self.label_map(raw) if self.label_map else raw).astype(np.int64)

    def __len__(self) -> int:
        return int(len(self.indices))

    def load(self, index: int) -> Any:
        return self.base.load(int(self.indices[index]))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.base.fingerprint().encode())
        h.update(np.asarray(self.indices, dtype=np.int64).tobytes())
        h.update(self.labels.tobytes())
        return h.hexdigest()[:16]


class LazyImages:
    """An image source built on first use (``make()``): a test split is only opened when something
    needs it, so building a benchmark and tuning on its validation split never touch a test file.
    ``make`` must be picklable (a module-level function or a ``functools.partial`` of one): the
    benchmark travels to Ray encoder actors. ``opened`` says whether it has been built."""

    def __init__(self, make: Callable[[], ImageSource], what: str) -> None:
        self.make, self.what = make, what
        self._src: ImageSource | None = None

    @property
    def opened(self) -> bool:
        return self._src is not None

    def _get(self) -> ImageSource:
        if self._src is None:
            self._src = self.make()
        return self._src

    @property
    def labels(self) -> np.ndarray:
        return self._get().labels

    def __len__(self) -> int:
        return len(self._get())

    def load(self, index: int) -> Any:
        return self._get().load(index)

    def fingerprint(self) -> str:
        return self._get().fingerprint()

    def __getstate__(self) -> dict[str, Any]:
        return {"make": self.make, "what": self.what, "_src": None}  # never ship opened pixels


@dataclass
class Task:
    """One step of the continual sequence."""

    name: str  # unique within the benchmark; also the column name of the accuracy matrix
    class_names: list[str]
    train: ImageSource
    test: ImageSource
    epochs: int  # default epochs for this task (the benchmark's schedule)
    augment: bool = True  # RandomResizedCrop + flip for training views (False for MNIST, EuroSAT)
    val: ImageSource | None = None  # held-out validation images (disjoint from train's shots); None: none yet

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> ImageSource | None:
        """The image source of split ``name`` (``train``, ``val`` or ``test``)."""
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split {name!r} (valid: train, val, test)")
        src: ImageSource | None = getattr(self, name)
        return src

    def class_counts(self) -> np.ndarray:
        return np.bincount(np.asarray(self.train.labels, dtype=np.int64), minlength=self.num_classes)


@dataclass
class Benchmark:
    name: str
    tasks: list[Task]
    description: str = ""

    @property
    def class_names(self) -> list[str]:
        return [c for t in self.tasks for c in t.class_names]

    @property
    def offsets(self) -> list[int]:
        out, acc = [], 0
        for t in self.tasks:
            out.append(acc)
            acc += t.num_classes
        return out

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def spec(self, splits: Sequence[str] = ("train", "val", "test")) -> dict[str, Any]:
        """What identifies the data: names, classes, content fingerprints of ``splits`` (a task's
        ``val`` only where it has one). Only the named splits are opened: a lazy test split is not
        read unless ``"test"`` is asked for."""
        return {
            "benchmark": self.name,
            "tasks": [
                {
                    "name": t.name,
                    "classes": t.class_names,
                    "augment": t.augment,
                    **{s: src.fingerprint() for s in splits if (src := t.split(s)) is not None},
                }
                for t in self.tasks
            ],
        }

    def split_spec(self, split: str) -> dict[str, Any]:
        """What identifies one split of every task (the key of that split's feature cache). Raises
        :class:`DataError` naming the first task without such a split."""
        missing = [t.name for t in self.tasks if t.split(split) is None]
        if missing:
            raise DataError(f"benchmark {self.name}: task {missing[0]} has no {split} images (data.val_per_class=0?)")
        spec = self.spec((split,))
        if split != "train":
            for t in spec["tasks"]:
                t.pop("augment")  # only training views are augmented
        return {**spec, "split": split}

    def has_split(self, split: str) -> bool:
        return all(t.split(split) is not None for t in self.tasks)

    def spec_hash(self, splits: Sequence[str] = ("train", "val", "test")) -> str:
        return hashlib.sha256(json.dumps(self.spec(splits), sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> Benchmark:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise DataError(f"benchmark {self.name}: task names must be unique, got {names}")
        for t in self.tasks:
            for split, src in (("train", t.train), ("test", t.test), ("val", t.val)):
                if src is None or (isinstance(src, LazyImages) and not src.opened):
                    continue  # a lazy split is checked when it is opened
                labels = np.asarray(src.labels)
                if len(src) == 0:
                    raise DataError(f"benchmark {self.name}: task {t.name} has no {split} images")
                if labels.min() < 0 or labels.max() >= t.num_classes:
                    raise DataError(f"benchmark {self.name}: task {t.name} {split} labels out of range")
        return self


def hold_out_indices(
    labels: np.ndarray, per_class: int, fraction: float, seed: int, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Validation images held out of a training pool that has no validation list: per class
    ``min(per_class, floor(n_c * fraction))`` of its images not in ``exclude`` (the few-shot sample,
    so validation never shares an image with training), drawn with NumPy seeded ``(seed, 1)``;
    sorted indices into ``labels``."""
    labels = np.asarray(labels, dtype=np.int64)
    banned = np.zeros(labels.shape[0], dtype=bool)
    if exclude is not None and len(exclude):
        banned[np.asarray(exclude, dtype=np.int64)] = True
    rng = np.random.default_rng([seed, 1])
    out: list[np.ndarray] = []
    for c in np.unique(labels):
        of_class = np.flatnonzero(labels == c)
        free = of_class[~banned[of_class]]
        k = min(per_class, int(of_class.size * fraction), free.size)
        if k > 0:
            out.append(rng.choice(free, size=k, replace=False))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def cap_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """At most ``per_class`` indices of each class (a benchmark's own validation list, capped),
    drawn with NumPy seeded ``(seed, 2)``; sorted indices into ``labels``."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng([seed, 2])
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out.append(idx if idx.size <= per_class else rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


SAMPLE_RULES = ("authors", "seeded")
"""How few-shot training images are drawn (``data.sample_rule``); see :func:`few_shot_indices`."""


def few_shot_indices(
    labels: np.ndarray, shots: int, seed: int, num_classes: int | None = None, rule: str = "seeded"
) -> np.ndarray:
    """``shots`` indices per class (X-TAIL protocol, method page section 7); with replacement for a
    class that has fewer than ``shots`` images.

    ``rule="authors"``: the authors' draw, CoOp's few-shot rule after ``random.seed(0)`` in each task:
    classes in the order of their first image in ``labels`` (the reader's list order), per class
    Python's ``random.sample(images, shots)``, or ``random.choices(images, k=shots)`` for a short
    class. It reproduces the authors' sample exactly when ``labels`` lists the images in the order of
    their reader (CoOp's split files, FGVC's variant lists and MNIST's idx files are read in file
    order). ``seed`` is not used: the authors' seed is 0.

    ``rule="seeded"``: NumPy's generator seeded with ``seed``, classes in label order, sorted draws.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n_cls = int(num_classes if num_classes is not None else labels.max() + 1)
    for c in range(n_cls):
        if not np.any(labels == c):
            raise DataError(f"class {c} has no training images; cannot sample {shots} shots")
    if rule == "authors":
        return _authors_few_shot(labels, shots)
    if rule != "seeded":
        raise DataError(f"unknown few-shot sample rule {rule!r} (valid: {', '.join(SAMPLE_RULES)})")
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    for c in range(n_cls):
        idx = np.flatnonzero(labels == c)
        replace = idx.size < shots
        out.append(np.sort(rng.choice(idx, size=shots, replace=replace)) if not replace else rng.choice(idx, size=shots, replace=True))
    return np.concatenate(out)


def _authors_few_shot(labels: np.ndarray, shots: int) -> np.ndarray:
    import random

    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels.tolist()):  # insertion order = order of each class's first image
        by_class.setdefault(int(y), []).append(i)
    rng = random.Random(0)
    out: list[int] = []
    for items in by_class.values():
        out.extend(rng.sample(items, shots) if len(items) >= shots else rng.choices(items, k=shots))
    return np.asarray(out, dtype=np.int64)


def scale_epochs(epochs: int, scale: float) -> int:
    return max(1, int(round(epochs * scale)))

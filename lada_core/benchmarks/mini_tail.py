"""``mini-tail``: a small benchmark shaped like X-TAIL that works offline on any machine.

Like X-TAIL, every task is a whole domain with its own class names (60 in all), and every test image
is scored against all class names of the benchmark, seen and unseen. Seven domains, in this order:

===========  =======  =========================================================  ==================
task         classes  images                                                     mini CLIP caption
===========  =======  =========================================================  ==================
textures     8        rendered: striped, chequered, dotted, ... (32 px)           domain only
fashion      10       Fashion-MNIST (Debian's ``dataset-fashion-mnist``)          4 classes by name
digits       10       scikit-learn's bundled 8 x 8 digits, named zero ... nine    domain only
shapes       8        rendered: circle, square, triangle, star, ...               3 classes by name
greek        10       rendered lower-case Greek letters (Debian's DejaVu fonts)   domain only
chess        6        rendered chess pieces: king, queen, rook, ... (DejaVu)      domain only
colours      8        rendered swatches of red, orange, yellow, ...               domain only
===========  =======  =========================================================  ==================

The project's mini CLIP (``lada-mini``, :mod:`lada_core.mini_clip`) was pretrained on other images of
the same kinds: with their class names for every third class of fashion and shapes, otherwise at the
level of the domain only (it knows a chess piece and can tell pieces apart, but not which is the
king). Its zero-shot accuracy is clearly above chance on fashion and shapes and near chance on the
others, as real CLIP is strong on Food and weak on Aircraft, and every task is learned above it.
Shapes, Greek letters and chess pieces are drawn dark on light paper (lightly tinted), at random
size, angle and place.

Every domain has train / val / test splits made once, with a fixed seed, disjoint: per class 100 train
images (the pool the shots are drawn from; the whole pool is the full-shot setting), 30 validation and
100 test images (scikit-learn's digits, ~180 per class: 60 test, 30 val, the rest train). The mini CLIP
is pretrained on none of them: Fashion-MNIST's remaining training images and rendered images of other
seeds. Each task's schedule is about :data:`STEPS_PER_TASK` optimiser steps at batch 64 (hundreds of
steps, as on X-TAIL), whatever the shots. Fashion-MNIST is read from
``/usr/share/datasets/fashion-mnist``, ``--data-root``, or ``$LADA_FASHION_MNIST_DIR``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from lada_core.benchmarks import register
from lada_core.benchmarks.base import ArrayImages, Benchmark, DataError, ImageSource, LazyImages, Subset, Task, few_shot_indices
from lada_core.benchmarks.idx import read_idx
from lada_core.benchmarks.render import CHESS, COLOURS, DIGITS, GREEK, SHAPES, TEXTURES, RenderedImages, balanced_labels

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
DIGIT_WORDS = DIGITS
DOMAINS: dict[str, list[str]] = {
    "textures": TEXTURES,
    "fashion": FASHION_CLASSES,
    "digits": DIGIT_WORDS,
    "shapes": SHAPES,
    "greek": GREEK,
    "chess": CHESS,
    "colours": COLOURS,
}
"""The tasks in order, with their class names."""
AUGMENT = {"textures": True, "fashion": True, "digits": False, "shapes": True, "greek": False, "chess": False, "colours": True}
"""Augmented training views (crop + flip) as on X-TAIL; none for digits and glyphs (as MNIST)."""

SPLIT_SEED = 0  # the train / val / test split of every domain (made once, never changes)
TRAIN_PER_CLASS, VAL_PER_CLASS, TEST_PER_CLASS = 100, 30, 100
DIGITS_VAL, DIGITS_TEST = 30, 60
STEPS_PER_TASK = 240  # optimiser steps per task at batch 64 (the per-task epochs follow from it)
BATCH = 64


def task_epochs(n_train: int, steps: int = STEPS_PER_TASK, batch: int = BATCH) -> int:
    """Epochs that give about ``steps`` optimiser steps over ``n_train`` images in batches of ``batch``."""
    return max(1, int(round(steps / math.ceil(n_train / batch))))


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}: install Debian's package "
        f"'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist) or pass --data-root "
        f"to a folder holding the idx files"
    )


def load_fashion_mnist(root: str | Path | None = None, splits: tuple[str, ...] = ("train", "test")) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images [60000,28,28] uint8, labels), "test": (...)}`` from the idx files (only
    the ``splits`` asked for are read: the test file is never opened while tuning)."""
    base = Path(root) if root else Path(os.environ.get("LADA_FASHION_MNIST_DIR", FASHION_DIR))
    if root and (base / "fashion-mnist").is_dir():
        base = base / "fashion-mnist"
    if not base.is_dir():
        raise DataError(
            f"Fashion-MNIST folder not found: {base}: install Debian's package 'dataset-fashion-mnist' "
            f"(apt-get install dataset-fashion-mnist) or pass --data-root"
        )
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        if split not in splits:
            continue
        images = read_idx(_find(base, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(base, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        out[split] = (images, labels)
    return out


def _per_class_cut(labels: np.ndarray, counts: list[int | None], seed: int) -> list[np.ndarray]:
    """Split the indices of every class, in a seeded random order, into consecutive parts of
    ``counts`` images per class (None: the rest). Returns one sorted index array per part."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in counts]
    for c in range(int(labels.max()) + 1):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for p, n in enumerate(counts):
            stop = idx.size if n is None else start + n
            if stop > idx.size:
                raise DataError(f"class {c} has {idx.size} images, fewer than the {sum(x or 0 for x in counts)} the split needs")
            parts[p].append(idx[start:stop])
            start = stop
    return [np.sort(np.concatenate(p)) for p in parts]


@dataclass(frozen=True)
class FashionSplit:
    """Indices into Fashion-MNIST's train and test files: mini-tail's train pool and val (train
    file), its test (t10k file), and what is left of the train file (the mini CLIP's pretraining)."""

    train: np.ndarray
    val: np.ndarray
    pretrain: np.ndarray
    test: np.ndarray


def fashion_split(train_labels: np.ndarray, test_labels: np.ndarray | None = None) -> FashionSplit:
    """The cut of Fashion-MNIST; ``test`` is empty when ``test_labels`` is not given (the train file's
    cut does not depend on the test file)."""
    train, val, rest = _per_class_cut(train_labels, [TRAIN_PER_CLASS, VAL_PER_CLASS, None], SPLIT_SEED)
    test = np.zeros(0, np.int64) if test_labels is None else _per_class_cut(test_labels, [TEST_PER_CLASS], SPLIT_SEED + 1)[0]
    return FashionSplit(train, val, rest, test)


def fashion_test(data_root: str | None = None) -> ArrayImages:
    """mini-tail's Fashion-MNIST test images (from the t10k file; read only when first used)."""
    xte, yte = load_fashion_mnist(data_root, ("test",))["test"]
    (test,) = _per_class_cut(yte, [TEST_PER_CLASS], SPLIT_SEED + 1)
    return ArrayImages(xte[test], yte[test], origin="fashion-mnist:test")


def load_digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's bundled 8x8 digits scaled to uint8, split per class (fixed seed): 60 test,
    30 val, the rest (about 90) train."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # [1797, 8, 8]
    labels = d.target.astype(np.int64)
    test, val, train = _per_class_cut(labels, [DIGITS_TEST, DIGITS_VAL, None], SPLIT_SEED)
    return {s: (images[i], labels[i]) for s, i in (("train", train), ("val", val), ("test", test))}


def _arrays(data: dict[str, tuple[np.ndarray, np.ndarray]], origin: str) -> dict[str, ImageSource]:
    return {s: ArrayImages(px, y, origin=f"{origin}:{s}") for s, (px, y) in data.items()}


def _rendered(domain: str) -> dict[str, ImageSource]:
    n = len(DOMAINS[domain])
    sizes = {"train": TRAIN_PER_CLASS, "val": VAL_PER_CLASS, "test": TEST_PER_CLASS}
    return {
        s: RenderedImages(domain, s, SPLIT_SEED, balanced_labels(n, per, seed=hash_seed(domain, s)))
        for s, per in sizes.items()
    }


def hash_seed(*parts: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256("|".join(parts).encode()).digest()[:4], "little")


def domain_splits(domain: str, data_root: str | None = None) -> dict[str, ImageSource]:
    """``{"train", "val", "test"}`` image sources of one domain (local labels), disjoint."""
    if domain == "fashion":
        xtr, ytr = load_fashion_mnist(data_root, ("train",))["train"]
        sp = fashion_split(ytr)
        out = _arrays({"train": (xtr[sp.train], ytr[sp.train]), "val": (xtr[sp.val], ytr[sp.val])}, "fashion-mnist")
        out["test"] = LazyImages(partial(fashion_test, data_root), "fashion test")  # the t10k file, read on first use
        return out
    if domain == "digits":
        return _arrays(load_digits_split(), "sklearn-digits")
    if domain in DOMAINS:
        return _rendered(domain)
    raise DataError(f"unknown mini-tail domain {domain!r} (valid: {', '.join(DOMAINS)})")


@register("mini-tail")
def mini_tail(data_root: str | None = None, shots: int | None = None, seed: int = 1, **_: object) -> Benchmark:
    """The seven domains of the module docstring; ``shots`` training images per class are drawn from
    each train pool with ``seed`` (None: the whole pool). The sampling and validation settings of
    X-TAIL (``sample_rule``, ``val_*``) do not apply: mini-tail's splits are made once, seeded."""
    tasks = []
    for i, (domain, names) in enumerate(DOMAINS.items()):
        sp = domain_splits(domain, data_root)
        train = sp["train"]
        if shots is not None:
            train = Subset(train, few_shot_indices(np.asarray(train.labels), shots, seed + i, len(names)))
        tasks.append(
            Task(
                name=domain, class_names=list(names), train=train, test=sp["test"], val=sp["val"],
                epochs=task_epochs(len(train)), augment=AUGMENT[domain],
            )
        )
    return Benchmark("mini-tail", tasks, description=__doc__.splitlines()[0])

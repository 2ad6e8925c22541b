"""``mini-tail``: a small X-TAIL-style benchmark that works offline on any machine.

Seven tasks with disjoint label spaces and classes named in words, evaluated over all 20 class
names: Fashion-MNIST in five tasks of two classes in label order, then scikit-learn's bundled
digits in two tasks (zero to four, five to nine). Fashion-MNIST is read from Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``), ``--data-root``, or the
folder named by the environment variable ``LADA_FASHION_MNIST_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lada_core.benchmarks import register
from lada_core.benchmarks.base import ArrayImages, Benchmark, DataError, Subset, Task, few_shot_indices
from lada_core.benchmarks.idx import read_idx

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
EPOCHS = 5  # per task; the mini benchmark is easy


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}: install Debian's package "
        f"'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist) or pass --data-root "
        f"to a folder holding the idx files"
    )


def load_fashion_mnist(root: str | Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images [60000,28,28] uint8, labels), "test": (...)}`` from the idx files."""
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
        images = read_idx(_find(base, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(base, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        out[split] = (images, labels)
    return out


def load_digits_split(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's bundled 8x8 digits, scaled to uint8 and split 70/30 per class (fixed seed)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # [1797, 8, 8]
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = int(round(0.7 * idx.size))
        train_idx.append(idx[:cut])
        test_idx.append(idx[cut:])
    tr, te = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))
    return {"train": (images[tr], labels[tr]), "test": (images[te], labels[te])}


class _LabelMap:
    """Dataset label -> the task's local label (a picklable callable, for Ray)."""

    def __init__(self, lut: np.ndarray) -> None:
        self.lut = lut

    def __call__(self, y: np.ndarray) -> np.ndarray:
        return self.lut[y]


def _slice_tasks(
    prefix: str, data: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str], groups: list[list[int]],
    shots: int | None, seed: int, origin: str, augment: bool,
) -> list[Task]:
    tasks = []
    train = ArrayImages(data["train"][0], data["train"][1], origin=origin + ":train")
    test = ArrayImages(data["test"][0], data["test"][1], origin=origin + ":test")
    for i, group in enumerate(groups):
        lut = np.full(len(names), -1, dtype=np.int64)
        lut[group] = np.arange(len(group))
        tr_idx = np.flatnonzero(np.isin(train.labels, group))
        if shots is not None:
            local = lut[train.labels[tr_idx]]
            tr_idx = tr_idx[few_shot_indices(local, shots, seed + i, len(group))]
        te_idx = np.flatnonzero(np.isin(test.labels, group))
        tasks.append(
            Task(
                name=f"{prefix}-{i + 1}",
                class_names=[names[c] for c in group],
                train=Subset(train, tr_idx, label_map=_LabelMap(lut)),
                test=Subset(test, te_idx, label_map=_LabelMap(lut)),
                epochs=EPOCHS,
                augment=augment,
            )
        )
    return tasks


@register("mini-tail")
def mini_tail(data_root: str | None = None, shots: int | None = None, seed: int = 1, **_: object) -> Benchmark:
    """mini-tail; the sampling and validation settings of X-TAIL (``sample_rule``, ``val_*``) do not apply."""
    fashion = load_fashion_mnist(data_root)
    digits = load_digits_split()
    tasks = _slice_tasks(
        "fashion", fashion, FASHION_CLASSES, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], shots, seed,
        origin="fashion-mnist", augment=True,
    )
    tasks += _slice_tasks(
        "digits", digits, DIGIT_WORDS, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], shots, seed,
        origin="sklearn-digits", augment=False,
    )
    return Benchmark("mini-tail", tasks, description=__doc__.splitlines()[0])

"""X-TAIL: ten datasets read from the CoOp on-disk layout, and user-defined task sequences.

Method page section 7. All ten datasets live under one root, in CoOp's folder names or in RAIL's
lowercase ones (both are tried, so no renaming is needed):

==============  ==================  ===========================================================
task name       folder (or RAIL's)   contents
==============  ==================  ===========================================================
Aircraft        Aircraft/            images/<id>.jpg, variants.txt,
                (fgvc_aircraft/)     images_variant_{train,val,test}.txt (lines ``<id> <variant>``)
Caltech101      Caltech101/          101_ObjectCategories/, split_zhou_Caltech101.json
                (caltech-101/)
DTD             DTD/ (dtd/)          images/, split_zhou_DescribableTextures.json
EuroSAT         EuroSAT/ (eurosat/)  2750/, split_zhou_EuroSAT.json
Flowers         Flowers/             jpg/, split_zhou_OxfordFlowers.json
                (oxford_flowers/)
Food101         Food/ (food-101/)    images/, split_zhou_Food101.json
MNIST           MNIST/ (mnist/)      MNIST/raw/ (or raw/, or the folder itself) with the idx files
                                     {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
OxfordPets      Pets/ (oxford_pets/) images/, split_zhou_OxfordPets.json
StanfordCars    StanfordCars/        split_zhou_StanfordCars.json (paths relative to the folder)
                (stanford_cars/)
SUN397          Sun397/ (sun397/)    SUN397/, split_zhou_SUN397.json
==============  ==================  ===========================================================

A split file is ``{"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}`` with
``relpath`` relative to the image folder. Tasks train on ``train`` and are evaluated on ``test``;
``val`` (and FGVC's ``images_variant_val.txt``) becomes the task's validation split, at most
``val_per_class`` images per class; a dataset without one (MNIST) holds validation images out of its
training pool (:func:`make_task`). Every image listed for ``train`` and ``val`` is checked to exist when the
benchmark is built (one directory listing per folder), so a wrong root fails at once; ``test`` images
are checked and read only when the test split is first used (:class:`~lada_core.benchmarks.base.LazyImages`:
tuning on validation data never opens a test file, and runs with the test images removed).

Class names: from the split files (``_`` replaced by a space) or ``variants.txt``; MNIST and EuroSAT
names are data files of this package (``lada_core/data/{mnist,eurosat}_classnames.txt``, the authors'
names: MNIST's 'number: "0 - zero"' ..., EuroSAT's CoOp names + " satellite location"). Override for any dataset: a ``classnames.txt`` inside the
dataset folder (one name per line in label order, ``#`` comments allowed) wins over both.

Benchmarks: ``xtail`` (order I) and ``xtail-order2`` (order II); ``shots`` = images per class sampled
by ``sample_rule`` (``authors``: the authors' draw, Python's ``random`` seeded 0 in each task;
``seeded``: NumPy seeded with ``seed``; with replacement for a short class; the same sample of a
dataset in both orders),
``shots=None`` = full-shot. Default epochs per task follow the method page's table, picked by
``shots is None``; :func:`xtail_tasks` takes an ``epochs`` override. ``user-yaml`` builds a sequence
from a YAML file (:func:`user_yaml_benchmark`).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from lada_core.benchmarks import register
from lada_core.benchmarks.base import (
    ArrayImages,
    Benchmark,
    DataError,
    FileImages,
    ImageSource,
    LazyImages,
    Subset,
    Task,
    cap_per_class,
    few_shot_indices,
    hold_out_indices,
)
from lada_core.benchmarks.idx import read_idx

ORDER_I: tuple[str, ...] = (
    "Aircraft", "Caltech101", "DTD", "EuroSAT", "Flowers",
    "Food101", "MNIST", "OxfordPets", "StanfordCars", "SUN397",
)
ORDER_II: tuple[str, ...] = (
    "StanfordCars", "Aircraft", "OxfordPets", "Food101", "SUN397",
    "MNIST", "Flowers", "DTD", "Caltech101", "EuroSAT",
)
ORDERS: dict[str, tuple[str, ...]] = {"I": ORDER_I, "II": ORDER_II}

EPOCHS_FEW_SHOT: dict[str, int] = {
    "Aircraft": 40, "Caltech101": 10, "DTD": 30, "EuroSAT": 100, "Flowers": 30,
    "Food101": 5, "MNIST": 200, "OxfordPets": 10, "StanfordCars": 30, "SUN397": 10,
}
EPOCHS_FULL_SHOT: dict[str, int] = {
    "Aircraft": 60, "Caltech101": 20, "DTD": 30, "EuroSAT": 20, "Flowers": 40,
    "Food101": 10, "MNIST": 20, "OxfordPets": 10, "StanfordCars": 20, "SUN397": 2,
}

DEFAULT_VAL_PER_CLASS = 10
"""Validation images per class (``data.val_per_class``); see the README, "Validation split"."""
DEFAULT_VAL_FRACTION = 0.1
"""Share of a class's training pool held out for validation where a dataset has no list (``data.val_fraction``)."""

CLASSNAMES_OVERRIDE = "classnames.txt"
"""A file of this name inside a dataset folder replaces that dataset's class names."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class DatasetSplits:
    """What a reader returns: one dataset's class names and its train / test images, and its own
    validation images where the dataset has a list of them (CoOp's ``val``, FGVC's variant_val)."""

    name: str
    class_names: list[str]
    train: ImageSource
    test: ImageSource
    augment: bool = True
    val: ImageSource | None = None


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def read_classnames_file(path: str | Path) -> list[str]:
    """Class names, one per line in label order; blank lines and lines starting with ``#`` skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read class names file {p}: {exc}") from None
    names = [line.strip() for line in text.splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise DataError(f"class names file {p} lists no names")
    return names


def packaged_classnames(stem: str) -> list[str]:
    """Names from ``lada_core/data/<stem>_classnames.txt`` (``stem`` = ``mnist`` or ``eurosat``)."""
    ref = resources.files("lada_core").joinpath("data", f"{stem}_classnames.txt")
    with resources.as_file(ref) as p:
        return read_classnames_file(p)


def _apply_override(names: list[str], dataset_dir: Path, dataset: str) -> list[str]:
    """``<dataset_dir>/classnames.txt`` wins over ``names``; it must list as many names."""
    override = dataset_dir / CLASSNAMES_OVERRIDE
    if not override.is_file():
        return names
    new = read_classnames_file(override)
    if len(new) != len(names):
        raise DataError(f"{dataset}: {override} lists {len(new)} class names, the data has {len(names)} classes")
    return new


def _pretty(name: str) -> str:
    return name.replace("_", " ").strip()


def check_files_exist(image_dir: Path, relpaths: Iterable[str], listed_in: str | Path, dataset: str) -> None:
    """Raise :class:`DataError` naming the first missing file and the count of missing ones.

    Cheap on large trees and network storage: one directory listing per parent folder, then a
    stat only for the names not found in a listing (case-insensitive file systems).
    """
    by_parent: dict[str, list[str]] = defaultdict(list)
    order: list[str] = []
    for rel in relpaths:
        full = os.path.join(image_dir, rel)
        by_parent[os.path.dirname(full)].append(full)
        order.append(full)
    missing: set[str] = set()
    for parent, files in by_parent.items():
        try:
            present = set(os.listdir(parent))
        except OSError:
            present = set()
        for full in files:
            if os.path.basename(full) not in present and not os.path.isfile(full):
                missing.add(full)
    if missing:
        first = next(f for f in order if f in missing)
        raise DataError(
            f"{dataset}: {len(missing)} image(s) listed in {listed_in} are missing, first: {first}"
        )


def checked_files(root: Path, paths: Sequence[str], labels: np.ndarray, listed_in: str, dataset: str) -> FileImages:
    """A :class:`FileImages` whose files are checked to exist first (the deferred check of a lazy
    test split: run when the split is first opened, never while a sweep tunes on validation data)."""
    check_files_exist(Path(root), paths, listed_in, dataset)
    return FileImages(Path(root), list(paths), np.asarray(labels, dtype=np.int64))


def lazy_files(root: Path, paths: Sequence[str], labels: np.ndarray, listed_in: str | Path, dataset: str) -> LazyImages:
    """The test split of a file-based dataset: listed now, checked and opened on first use."""
    return LazyImages(partial(checked_files, Path(root), list(paths), np.asarray(labels, dtype=np.int64), str(listed_in), dataset), f"{dataset} test")


# --------------------------------------------------------------------------------------------------
# Generic readers (also used by the user YAML)
# --------------------------------------------------------------------------------------------------


def _parse_split_items(data: Any, split: str, path: Path) -> list[tuple[str, int, str]]:
    items = data.get(split)
    if not isinstance(items, list):
        raise DataError(f"split file {path}: key {split!r} must be a list of [relpath, label, classname]")
    out = []
    for i, item in enumerate(items):
        ok = (
            isinstance(item, (list, tuple)) and len(item) == 3 and isinstance(item[0], str)
            and isinstance(item[1], int) and not isinstance(item[1], bool) and item[1] >= 0
            and isinstance(item[2], str)
        )
        if not ok:
            raise DataError(f"split file {path}: {split}[{i}] is {item!r}, expected [relpath, label, classname]")
        out.append((item[0], int(item[1]), item[2]))
    return out


def read_split_file(split_file: str | Path, image_dir: str | Path, name: str) -> DatasetSplits:
    """A CoOp split file: ``{"train": [[relpath, label, classname], ...], "val": ..., "test": ...}``.

    Labels are taken as written; the class name of label ``c`` comes from the file (``_`` -> space).
    Labels must cover ``0..C-1``. Every ``train`` and ``val`` image must exist under ``image_dir``; ``test``
    images are checked when the test split is first opened.
    """
    path, img_dir = Path(split_file), Path(image_dir)
    if not path.is_file():
        raise DataError(f"{name}: split file not found: {path}")
    if not img_dir.is_dir():
        raise DataError(f"{name}: image folder not found: {img_dir}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{name}: unreadable split file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"split file {path}: expected a JSON object with keys 'train' and 'test'")
    splits = {s: _parse_split_items(data, s, path) for s in ("train", "test")}
    if "val" in data:
        splits["val"] = _parse_split_items(data, "val", path)
    names: dict[int, str] = {}
    for split, items in splits.items():
        for rel, label, cname in items:
            known = names.setdefault(label, cname)
            if known != cname:
                raise DataError(
                    f"split file {path}: label {label} is named both {known!r} and {cname!r} ({split}: {rel})"
                )
    if not names:
        raise DataError(f"split file {path}: no images listed")
    n_cls = max(names) + 1
    gaps = [c for c in range(n_cls) if c not in names]
    if gaps:
        raise DataError(f"split file {path}: labels must cover 0..{n_cls - 1}; no image has label {gaps[0]}")
    check_files_exist(img_dir, [rel for s in ("train", "val") for rel, _, _ in splits.get(s, [])], path, name)

    def source(split: str) -> FileImages:
        items = splits[split]
        return FileImages(img_dir, [rel for rel, _, _ in items], np.array([y for _, y, _ in items], dtype=np.int64))

    test = splits["test"]  # checked and opened on first use (tuning never opens a test image)
    test_src = lazy_files(img_dir, [rel for rel, _, _ in test], np.array([y for _, y, _ in test], dtype=np.int64), path, name)
    out = DatasetSplits(name, [_pretty(names[c]) for c in range(n_cls)], source("train"), test_src)
    out.val = source("val") if splits.get("val") else None
    return out


def _list_images(folder: Path) -> list[str]:
    return sorted(
        f for f in os.listdir(folder)
        if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS) and (folder / f).is_file()
    )


def read_image_folder(folder: str | Path, name: str) -> DatasetSplits:
    """An ImageFolder-style tree: ``train/<class>/*`` and ``test/<class>/*`` (image extensions only).

    Classes are the sub-folders of ``train`` in sorted order (``_`` -> space in the names); every
    ``test`` class folder must also exist in ``train``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{name}: folder not found: {root}")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{name}: {train_dir} not found (an image folder needs train/<class>/ and test/<class>/)")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{name}: no class folders in {train_dir}")
    val = _folder_split(root, "val", tuple(classes), name) if (root / "val").is_dir() else None  # optional
    test = LazyImages(partial(_folder_split, root, "test", tuple(classes), name), f"{name} test")  # listed on first use
    return DatasetSplits(name, [_pretty(c) for c in classes], _folder_split(root, "train", tuple(classes), name), test, val=val)


def _folder_split(root: Path, split: str, classes: tuple[str, ...], name: str) -> FileImages:
    """``root/<split>/<class>/*`` of an image folder; ``classes`` are train's class folders."""
    d = root / split
    if not d.is_dir():
        raise DataError(f"{name}: {d} not found (an image folder needs train/<class>/ and test/<class>/)")
    index = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for sub in sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub not in index:
            raise DataError(f"{name}: class folder {d / sub} has no counterpart in {root / 'train'}")
        files = _list_images(d / sub)
        if split == "train" and not files:
            raise DataError(f"{name}: class folder {d / sub} holds no images")
        paths += [f"{sub}/{f}" for f in files]
        labels += [index[sub]] * len(files)
    return FileImages(d, paths, np.array(labels, dtype=np.int64))


# --------------------------------------------------------------------------------------------------
# The ten X-TAIL readers; each takes the dataset folder
# --------------------------------------------------------------------------------------------------


def _read_aircraft(d: Path) -> DatasetSplits:
    image_dir = d / "images"
    if not image_dir.is_dir():
        raise DataError(f"Aircraft: image folder not found: {image_dir}")
    names = read_classnames_file(d / "variants.txt")
    index = {n: i for i, n in enumerate(names)}

    def split(s: str) -> ImageSource:
        path = d / f"images_variant_{s}.txt"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise DataError(f"Aircraft: cannot read {path}: {exc}") from None
        paths, labels = [], []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in index:
                raise DataError(f"Aircraft: {path} line {n}: variant {variant!r} is not in {d / 'variants.txt'}")
            paths.append(f"{image_id}.jpg")
            labels.append(index[variant])
        if s == "test":  # checked and opened on first use
            return lazy_files(image_dir, paths, np.array(labels, dtype=np.int64), path, "Aircraft")
        check_files_exist(image_dir, paths, path, "Aircraft")
        return FileImages(image_dir, paths, np.array(labels, dtype=np.int64))

    val = split("val") if (d / "images_variant_val.txt").is_file() else None
    return DatasetSplits("Aircraft", names, split("train"), split("test"), val=val)


def _split_reader(name: str, split_file: str, image_sub: str, packaged: str | None = None,
                  augment: bool = True) -> Callable[[Path], DatasetSplits]:
    def read(d: Path) -> DatasetSplits:
        out = read_split_file(d / split_file, d / image_sub if image_sub else d, name)
        if packaged is not None:
            names = packaged_classnames(packaged)
            if len(names) != len(out.class_names):
                raise DataError(
                    f"{name}: the packaged class names (lada_core/data/{packaged}_classnames.txt) list "
                    f"{len(names)} classes, {d / split_file} has {len(out.class_names)}"
                )
            out.class_names = names
        out.augment = augment
        return out

    return read


def _find_idx(raw: Path, stem: str) -> Path:
    for candidate in (raw / stem, raw / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"MNIST: idx file {stem} (or {stem}.gz) not found in {raw}")


def _read_mnist(d: Path) -> DatasetSplits:
    candidates = (d / "MNIST" / "raw", d / "raw", d)
    raw = next((c for c in candidates if any((c / f"train-images-idx3-ubyte{gz}").is_file() for gz in ("", ".gz"))), None)
    if raw is None:
        looked = ", ".join(str(c) for c in candidates)
        raise DataError(f"MNIST: idx file train-images-idx3-ubyte(.gz) not found (looked in {looked})")
    names = packaged_classnames("mnist")
    test = LazyImages(partial(_mnist_idx, raw, "t10k", len(names)), "MNIST test")  # t10k read on first use
    return DatasetSplits("MNIST", names, _mnist_idx(raw, "train", len(names)), test, augment=False)


def _mnist_idx(raw: Path, prefix: str, n_names: int) -> ArrayImages:
    """One MNIST idx pair (``train`` or ``t10k``) as an in-memory source."""
    img_path = _find_idx(raw, f"{prefix}-images-idx3-ubyte")
    lab_path = _find_idx(raw, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lab_path).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"MNIST: {img_path} {images.shape} does not match {lab_path} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_names):
        raise DataError(f"MNIST: {lab_path} has labels outside 0..{n_names - 1}")
    return ArrayImages(images.astype(np.uint8), labels, origin=str(img_path))


@dataclass(frozen=True)
class XTailReader:
    """One X-TAIL dataset: its folder names (CoOp's, then RAIL's), reader and default epochs."""

    name: str
    folders: tuple[str, ...]
    read: Callable[[Path], DatasetSplits]
    epochs_few_shot: int
    epochs_full_shot: int


_READERS_SPEC: list[tuple[str, tuple[str, ...], Callable[[Path], DatasetSplits]]] = [
    ("Aircraft", ("Aircraft", "fgvc_aircraft"), _read_aircraft),
    ("Caltech101", ("Caltech101", "caltech-101"),
     _split_reader("Caltech101", "split_zhou_Caltech101.json", "101_ObjectCategories")),
    ("DTD", ("DTD", "dtd"), _split_reader("DTD", "split_zhou_DescribableTextures.json", "images")),
    ("EuroSAT", ("EuroSAT", "eurosat"),
     _split_reader("EuroSAT", "split_zhou_EuroSAT.json", "2750", packaged="eurosat", augment=False)),
    ("Flowers", ("Flowers", "oxford_flowers"), _split_reader("Flowers", "split_zhou_OxfordFlowers.json", "jpg")),
    ("Food101", ("Food", "food-101"), _split_reader("Food101", "split_zhou_Food101.json", "images")),
    ("MNIST", ("MNIST", "mnist"), _read_mnist),
    ("OxfordPets", ("Pets", "oxford_pets"), _split_reader("OxfordPets", "split_zhou_OxfordPets.json", "images")),
    ("StanfordCars", ("StanfordCars", "stanford_cars"),
     _split_reader("StanfordCars", "split_zhou_StanfordCars.json", "")),
    ("SUN397", ("Sun397", "sun397"), _split_reader("SUN397", "split_zhou_SUN397.json", "SUN397")),
]

READERS: dict[str, XTailReader] = {
    name: XTailReader(name, folders, read, EPOCHS_FEW_SHOT[name], EPOCHS_FULL_SHOT[name])
    for name, folders, read in _READERS_SPEC
}
"""The ten X-TAIL readers by task name, in order I."""


def _reader(name: str) -> XTailReader:
    if name not in READERS:
        raise DataError(f"unknown X-TAIL dataset {name!r} (valid: {', '.join(READERS)})")
    return READERS[name]


def find_dataset_dir(name: str, root: str | Path) -> Path:
    """The folder of dataset ``name`` under ``root``: CoOp's spelling, then RAIL's lowercase one.

    ``root`` may also be the dataset folder itself (its name is one of the accepted spellings).
    """
    spec, base = _reader(name), Path(root).expanduser()
    for folder in spec.folders:
        if (base / folder).is_dir():
            return base / folder
    if base.is_dir() and base.name in spec.folders:
        return base  # ``root`` is the dataset folder itself
    looked = " or ".join(str(base / f) + "/" for f in spec.folders)
    raise DataError(f"{name}: dataset folder not found: looked for {looked}")


def read_dataset(name: str, root: str | Path) -> DatasetSplits:
    """Read X-TAIL dataset ``name`` (a key of :data:`READERS`) from ``root`` (see the module doc)."""
    d = find_dataset_dir(name, root)
    out = _reader(name).read(d)
    out.class_names = _apply_override(out.class_names, d, name)
    return out


# --------------------------------------------------------------------------------------------------
# Tasks and benchmarks
# --------------------------------------------------------------------------------------------------


def make_task(splits: DatasetSplits, shots: int | None, seed: int, epochs: int, name: str | None = None,
              augment: bool | None = None, sample_rule: str = "authors", val_per_class: int = DEFAULT_VAL_PER_CLASS,
              val_fraction: float = DEFAULT_VAL_FRACTION) -> Task:
    """A :class:`Task` from a reader's output; ``shots`` samples the training images per class
    (:func:`few_shot_indices` with ``sample_rule``, with replacement for a short class), ``None`` keeps all.

    Validation: the dataset's own validation list, at most ``val_per_class`` images per class; a
    dataset without one (MNIST, an image folder without ``val/``) holds images out of its training
    pool: per class ``min(val_per_class, floor(n * val_fraction))``, never one of the few-shot images
    (they are drawn first, from the whole pool, so the few-shot sample stays the authors'). In
    full-shot the held-out images leave the training set. ``val_per_class=0``: no validation split."""
    task_name = name or splits.name
    pool = splits.train
    labels = np.asarray(pool.labels)
    shot_idx = None
    if shots is not None:
        if shots < 1:
            raise DataError(f"{task_name}: shots must be a positive number or None (full-shot), got {shots}")
        try:
            shot_idx = few_shot_indices(labels, shots, seed, len(splits.class_names), sample_rule)
        except DataError as exc:
            raise DataError(f"{task_name}: {exc}") from None
    val: ImageSource | None = None
    train: ImageSource = pool if shot_idx is None else Subset(pool, shot_idx)
    if val_per_class > 0 and splits.val is not None:
        val = Subset(splits.val, cap_per_class(np.asarray(splits.val.labels), val_per_class, seed))
    elif val_per_class > 0:
        held = hold_out_indices(labels, val_per_class, val_fraction, seed, exclude=shot_idx)
        if held.size:
            val = Subset(pool, held)
            if shot_idx is None:
                train = Subset(pool, np.setdiff1d(np.arange(len(pool)), held))
    return Task(
        name=task_name,
        class_names=list(splits.class_names),
        train=train,
        test=splits.test,
        epochs=int(epochs),
        augment=splits.augment if augment is None else augment,
        val=val,
    )


def _order_names(order: str | int | Sequence[str]) -> tuple[str, ...]:
    if isinstance(order, int):
        order = str(order)  # 1 / 2 -> "1" / "2"
    if isinstance(order, str):
        key = {"1": "I", "2": "II", "i": "I", "ii": "II"}.get(order.lower(), order)
        if key not in ORDERS:
            raise DataError(f"unknown X-TAIL order {order!r} (valid: I, II, or a list of dataset names)")
        return ORDERS[key]
    names = tuple(order)
    for n in names:
        _reader(n)
    if len(set(names)) != len(names):
        raise DataError(f"X-TAIL order lists a dataset twice: {list(names)}")
    return names


def default_epochs(name: str, shots: int | None) -> int:
    """The method page's epochs for X-TAIL dataset ``name``: full-shot column when ``shots is None``."""
    spec = _reader(name)
    return spec.epochs_full_shot if shots is None else spec.epochs_few_shot


def xtail_tasks(
    root: str | Path,
    order: str | int | Sequence[str] = "I",
    shots: int | None = 16,
    seed: int = 1,
    epochs: Mapping[str, int] | None = None,
    sample_rule: str = "authors",
    val_per_class: int = DEFAULT_VAL_PER_CLASS, val_fraction: float = DEFAULT_VAL_FRACTION,
) -> list[Task]:
    """The X-TAIL tasks read from ``root`` in ``order`` ("I", "II" or a list of dataset names).

    ``shots=None`` is full-shot. Each dataset is sampled with ``seed`` itself, so a dataset gets the
    same few-shot sample in every order. ``epochs`` overrides the default epochs of named tasks.
    """
    names = _order_names(order)
    overrides = dict(epochs or {})
    for n, e in overrides.items():
        if n not in READERS:
            raise DataError(f"epochs override for unknown X-TAIL dataset {n!r} (valid: {', '.join(READERS)})")
        if not isinstance(e, int) or isinstance(e, bool) or e < 1:
            raise DataError(f"epochs override for {n} must be a positive integer, got {e!r}")
    return [
        make_task(read_dataset(n, root), shots, seed, overrides.get(n, default_epochs(n, shots)), sample_rule=sample_rule,
                  val_per_class=val_per_class, val_fraction=val_fraction)
        for n in names
    ]


def _need_root(data_root: str | None, bench: str) -> str:
    if not data_root:
        raise DataError(f"benchmark {bench} needs --data-root: the folder holding the ten X-TAIL dataset folders")
    if not Path(data_root).expanduser().is_dir():
        raise DataError(f"benchmark {bench}: data root not found: {data_root}")
    return data_root


@register("xtail")
def xtail(data_root: str | None = None, shots: int | None = None, seed: int = 1, sample_rule: str = "authors",
          val_per_class: int = DEFAULT_VAL_PER_CLASS, val_fraction: float = DEFAULT_VAL_FRACTION) -> Benchmark:
    """X-TAIL in order I (method page section 7)."""
    tasks = xtail_tasks(_need_root(data_root, "xtail"), "I", shots, seed, sample_rule=sample_rule,
                        val_per_class=val_per_class, val_fraction=val_fraction)
    return Benchmark("xtail", tasks, description="X-TAIL, order I")


@register("xtail-order2")
def xtail_order2(data_root: str | None = None, shots: int | None = None, seed: int = 1, sample_rule: str = "authors",
                 val_per_class: int = DEFAULT_VAL_PER_CLASS, val_fraction: float = DEFAULT_VAL_FRACTION) -> Benchmark:
    """X-TAIL in order II (method page section 7)."""
    tasks = xtail_tasks(_need_root(data_root, "xtail-order2"), "II", shots, seed, sample_rule=sample_rule,
                        val_per_class=val_per_class, val_fraction=val_fraction)
    return Benchmark("xtail-order2", tasks, description="X-TAIL, order II")


# --------------------------------------------------------------------------------------------------
# User-defined benchmark (YAML)
# --------------------------------------------------------------------------------------------------

_TOP_KEYS = ("name", "description", "default_epochs", "val_fraction", "datasets")
_ENTRY_KEYS = {
    "reader": ("reader", "root", "name", "epochs", "augment", "val_fraction"),
    "folder": ("name", "folder", "epochs", "augment", "val_fraction"),
    "split_file": ("name", "split_file", "image_dir", "epochs", "augment", "val_fraction"),
}


def _val_fraction(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise DataError(f"{where}: 'val_fraction' must be a number in [0, 1), got {value!r}")
    return float(value)
DEFAULT_USER_EPOCHS = 10


def _resolve(value: Any, where: str, yaml_dir: Path, data_root: str | None) -> Path:
    """An absolute path as is; a relative one against the YAML's folder, then ``data_root``."""
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: expected a path string, got {value!r}")
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    candidates = [yaml_dir / p] + ([Path(data_root).expanduser() / p] if data_root else [])
    for c in candidates:
        if c.exists():
            return c
    raise DataError(f"{where}: path {value!r} not found (looked in {', '.join(str(c) for c in candidates)})")


def _load_yaml(path: Path) -> Any:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read benchmark file {path}: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise DataError(f"{path}: invalid YAML{at}: {problem}") from None


def _user_entry(
    entry: Any, i: int, path: Path, data_root: str | None, shots: int | None, seed: int, default_ep: int,
    sample_rule: str = "authors", val_per_class: int = DEFAULT_VAL_PER_CLASS, val_fraction: float = DEFAULT_VAL_FRACTION,
) -> Task:
    where = f"{path}: datasets[{i}]"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a mapping such as {{reader: DTD}}, got {entry!r}")
    kinds = [k for k in _ENTRY_KEYS if k in entry]
    if len(kinds) != 1:
        raise DataError(f"{where}: needs exactly one of 'reader', 'folder', 'split_file', got keys {sorted(entry)}")
    kind = kinds[0]
    unknown = [k for k in entry if k not in _ENTRY_KEYS[kind]]
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]!r} for a {kind} entry (allowed: {', '.join(_ENTRY_KEYS[kind])})")
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise DataError(f"{where}: 'name' must be a non-empty string, got {name!r}")
    epochs = entry.get("epochs")
    if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1):
        raise DataError(f"{where}: 'epochs' must be a positive integer, got {epochs!r}")
    augment = entry.get("augment")
    if augment is not None and not isinstance(augment, bool):
        raise DataError(f"{where}: 'augment' must be true or false, got {augment!r}")
    yaml_dir = path.parent
    frac = _val_fraction(entry["val_fraction"], where) if "val_fraction" in entry else val_fraction

    if kind == "reader":
        reader = entry["reader"]
        if not isinstance(reader, str) or reader not in READERS:
            raise DataError(f"{where}: unknown reader {reader!r} (valid: {', '.join(READERS)})")
        if "root" in entry:
            root = _resolve(entry["root"], f"{where}.root", yaml_dir, data_root)
        elif data_root:
            root = Path(data_root).expanduser()
        else:
            raise DataError(f"{where}: reader {reader} needs a 'root' or --data-root")
        splits = read_dataset(reader, root)
        ep = epochs if epochs is not None else default_epochs(reader, shots)
        return make_task(splits, shots, seed, ep, name=name, augment=augment, sample_rule=sample_rule,
                         val_per_class=val_per_class, val_fraction=frac)

    if name is None:
        raise DataError(f"{where}: a {kind} entry needs a 'name'")
    if kind == "folder":
        splits = read_image_folder(_resolve(entry["folder"], f"{where}.folder", yaml_dir, data_root), name)
    else:
        split_file = _resolve(entry["split_file"], f"{where}.split_file", yaml_dir, data_root)
        image_dir = (
            _resolve(entry["image_dir"], f"{where}.image_dir", yaml_dir, data_root)
            if "image_dir" in entry else split_file.parent
        )
        splits = read_split_file(split_file, image_dir, name)
    return make_task(splits, shots, seed, epochs if epochs is not None else default_ep, augment=augment, sample_rule=sample_rule,
                     val_per_class=val_per_class, val_fraction=frac)


@register("user-yaml")
def user_yaml_benchmark(
    path: str | Path, data_root: str | None = None, shots: int | None = None, seed: int = 1,
    sample_rule: str = "authors", val_per_class: int = DEFAULT_VAL_PER_CLASS, val_fraction: float = DEFAULT_VAL_FRACTION,
) -> Benchmark:
    """A task sequence described by a YAML file (see the README section "Your own task sequence").

    Top-level keys: ``datasets`` (required list, in task order), ``name`` (default: the file's stem),
    ``description``, ``default_epochs`` (for folder / split-file entries without ``epochs``; 10).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"benchmark file not found: {p}")
    doc = _load_yaml(p)
    if not isinstance(doc, dict):
        raise DataError(f"{p}: expected a mapping with a 'datasets' list at the top level")
    unknown = [k for k in doc if k not in _TOP_KEYS]
    if unknown:
        raise DataError(f"{p}: unknown key {unknown[0]!r} (allowed: {', '.join(_TOP_KEYS)})")
    entries = doc.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{p}: 'datasets' must be a non-empty list")
    default_ep = doc.get("default_epochs", DEFAULT_USER_EPOCHS)
    if not isinstance(default_ep, int) or isinstance(default_ep, bool) or default_ep < 1:
        raise DataError(f"{p}: 'default_epochs' must be a positive integer, got {default_ep!r}")
    name = doc.get("name", p.stem)
    description = doc.get("description", f"user benchmark {p}")
    if not isinstance(name, str) or not isinstance(description, str):
        raise DataError(f"{p}: 'name' and 'description' must be strings")
    frac = doc.get("val_fraction", val_fraction)
    tasks = [_user_entry(e, i, p, data_root, shots, seed, default_ep, sample_rule, val_per_class, _val_fraction(frac, str(p)))
             for i, e in enumerate(entries)]
    return Benchmark(name, tasks, description=description)


__all__ = [
    "DEFAULT_USER_EPOCHS",
    "EPOCHS_FEW_SHOT",
    "EPOCHS_FULL_SHOT",
    "ORDER_I",
    "ORDER_II",
    "READERS",
    "DatasetSplits",
    "XTailReader",
    "check_files_exist",
    "default_epochs",
    "find_dataset_dir",
    "make_task",
    "packaged_classnames",
    "read_classnames_file",
    "read_dataset",
    "read_image_folder",
    "read_split_file",
    "user_yaml_benchmark",
    "xtail",
    "xtail_order2",
    "xtail_tasks",
]

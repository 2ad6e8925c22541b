"""A complete, tiny X-TAIL tree in the CoOp on-disk layout, for tests (no downloads).

``make_xtail_tree(root)`` writes all ten datasets (method page section 7) with a few classes each and
small random JPEG images; MNIST is written as idx files. MNIST and EuroSAT always get their real ten
classes (their class names are fixed data files of ``lada_core``); every other dataset gets
``classes_per_dataset`` classes. Each class has ``train_per_class`` train, ``val_per_class`` val and
``test_per_class`` test images. The layout is written independently of ``lada_core`` so that the
readers are checked against it, not against themselves.
"""

from __future__ import annotations

import gzip
import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

COOP_FOLDERS: dict[str, str] = {
    "Aircraft": "Aircraft", "Caltech101": "Caltech101", "DTD": "DTD", "EuroSAT": "EuroSAT",
    "Flowers": "Flowers", "Food101": "Food", "MNIST": "MNIST", "OxfordPets": "Pets",
    "StanfordCars": "StanfordCars", "SUN397": "Sun397",
}
RAIL_FOLDERS: dict[str, str] = {
    "Aircraft": "fgvc_aircraft", "Caltech101": "caltech-101", "DTD": "dtd", "EuroSAT": "eurosat",
    "Flowers": "oxford_flowers", "Food101": "food-101", "MNIST": "mnist", "OxfordPets": "oxford_pets",
    "StanfordCars": "stanford_cars", "SUN397": "sun397",
}
FIXED_CLASSES: dict[str, int] = {"MNIST": 10, "EuroSAT": 10}

# Raw class names as the real files spell them (underscores where CoOp's split files have them).
_NAMES: dict[str, list[str]] = {
    "Aircraft": ["707-320", "A300B4", "F/A-18", "Cessna 172", "DHC-8-100"],
    "Caltech101": ["accordion", "airplane", "anchor", "ant", "barrel"],
    "DTD": ["banded", "blotchy", "braided", "bubbly", "bumpy"],
    "Flowers": ["pink_primrose", "hard-leaved_pocket_orchid", "canterbury_bells", "sweet_pea", "tiger_lily"],
    "Food101": ["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beet_salad"],
    "OxfordPets": ["abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle"],
    "StanfordCars": ["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Acura TL Sedan",
                     "2008 Acura TL Type-S", "2012 Acura TSX Sedan"],
    "SUN397": ["abbey", "airplane_cabin", "airport_terminal", "alley", "amphitheater"],
}
EUROSAT_FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
                   "Pasture", "PermanentCrop", "Residential", "River", "SeaLake"]
EUROSAT_SPLIT_NAMES = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road",
                       "Industrial Buildings", "Pasture Land", "Permanent Crop Land",
                       "Residential Buildings", "River", "Sea or Lake"]
SPLITS = ("train", "val", "test")


def raw_class_names(dataset: str, classes_per_dataset: int = 3) -> list[str]:
    """The class names the fixture writes for ``dataset`` (as in the split file / variants.txt)."""
    if dataset == "MNIST":
        return [str(d) for d in range(10)]
    if dataset == "EuroSAT":
        return list(EUROSAT_SPLIT_NAMES)
    base = _NAMES[dataset]
    return [base[c] if c < len(base) else f"{dataset.lower()}_class_{c}" for c in range(classes_per_dataset)]


def num_classes(dataset: str, classes_per_dataset: int = 3) -> int:
    """How many classes the fixture writes for ``dataset``."""
    return FIXED_CLASSES.get(dataset, classes_per_dataset)


def _write_jpeg(path: Path, rng: np.random.Generator, size: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def _split_dataset(
    d: Path, split_file: str, image_sub: str, names: list[str], counts: dict[str, int],
    relpath: Callable[[int, str, str, int], str], rng: np.random.Generator, size: int,
) -> None:
    """Write images under ``d/image_sub`` and a CoOp split file listing them."""
    image_dir = d / image_sub if image_sub else d
    data: dict[str, list[list[object]]] = {s: [] for s in SPLITS}
    k = 0
    for s in SPLITS:
        for label, cname in enumerate(names):
            for _ in range(counts[s]):
                k += 1
                rel = relpath(label, cname, s, k)
                _write_jpeg(image_dir / rel, rng, size)
                data[s].append([rel, label, cname])
    d.mkdir(parents=True, exist_ok=True)
    (d / split_file).write_text(json.dumps(data, indent=1), encoding="utf-8")


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    code = 0x08
    header = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def make_xtail_tree(
    root: Path,
    classes_per_dataset: int = 3,
    train_per_class: int = 3,
    test_per_class: int = 2,
    *,
    val_per_class: int = 1,
    rail_names: bool = False,
    mnist_gzip: bool = False,
    image_size: int = 16,
    seed: int = 0,
) -> Path:
    """Write a tiny X-TAIL under ``root`` (CoOp folder names, or RAIL's with ``rail_names``); return root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    folders = RAIL_FOLDERS if rail_names else COOP_FOLDERS
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    c = classes_per_dataset

    # Aircraft: images/<id>.jpg, variants.txt, images_variant_<split>.txt ("<id> <variant>").
    d = root / folders["Aircraft"]
    names = raw_class_names("Aircraft", c)
    (d / "images").mkdir(parents=True, exist_ok=True)
    (d / "variants.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
    image_id = 1000000
    for s in SPLITS:
        lines = []
        for cname in names:
            for _ in range(counts[s]):
                image_id += 1
                _write_jpeg(d / "images" / f"{image_id:07d}.jpg", rng, image_size)
                lines.append(f"{image_id:07d} {cname}\n")
        (d / f"images_variant_{s}.txt").write_text("".join(lines), encoding="utf-8")

    def per_class_folder(label: int, cname: str, s: str, k: int) -> str:
        return f"{cname}/image_{k:04d}.jpg"

    _split_dataset(root / folders["Caltech101"], "split_zhou_Caltech101.json", "101_ObjectCategories",
                   raw_class_names("Caltech101", c), counts, per_class_folder, rng, image_size)
    _split_dataset(root / folders["DTD"], "split_zhou_DescribableTextures.json", "images",
                   raw_class_names("DTD", c), counts,
                   lambda y, n, s, k: f"{n}/{n}_{k:04d}.jpg", rng, image_size)
    _split_dataset(root / folders["EuroSAT"], "split_zhou_EuroSAT.json", "2750", EUROSAT_SPLIT_NAMES, counts,
                   lambda y, n, s, k: f"{EUROSAT_FOLDERS[y]}/{EUROSAT_FOLDERS[y]}_{k}.jpg", rng, image_size)
    _split_dataset(root / folders["Flowers"], "split_zhou_OxfordFlowers.json", "jpg",
                   raw_class_names("Flowers", c), counts,
                   lambda y, n, s, k: f"image_{k:05d}.jpg", rng, image_size)
    _split_dataset(root / folders["Food101"], "split_zhou_Food101.json", "images",
                   raw_class_names("Food101", c), counts,
                   lambda y, n, s, k: f"{n}/{100000 + k}.jpg", rng, image_size)
    _split_dataset(root / folders["OxfordPets"], "split_zhou_OxfordPets.json", "images",
                   raw_class_names("OxfordPets", c), counts,
                   lambda y, n, s, k: f"{n}_{k}.jpg", rng, image_size)
    _split_dataset(root / folders["StanfordCars"], "split_zhou_StanfordCars.json", "",
                   raw_class_names("StanfordCars", c), counts,
                   lambda y, n, s, k: f"cars_{'test' if s == 'test' else 'train'}/{k:05d}.jpg", rng, image_size)
    _split_dataset(root / folders["SUN397"], "split_zhou_SUN397.json", "SUN397",
                   raw_class_names("SUN397", c), counts,
                   lambda y, n, s, k: f"{n[0]}/{_slug(n)}/sun_{k:06d}.jpg", rng, image_size)

    # MNIST: idx files in <folder>/MNIST/raw (torchvision names), every digit present.
    raw = root / folders["MNIST"] / "MNIST" / "raw"
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        images = rng.integers(0, 256, size=(labels.size, 28, 28), dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images, mnist_gzip)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, mnist_gzip)
    return root


def remove_test_images(root: Path) -> int:
    """Delete every test image of a tree written by :func:`make_xtail_tree` (CoOp names): the images
    the split files and FGVC's test list name, and MNIST's t10k files. Returns how many files went."""
    root = Path(root)
    gone: list[Path] = []
    for split_file in sorted(root.glob("*/split_zhou_*.json")):
        image_dir = {"split_zhou_Caltech101.json": "101_ObjectCategories", "split_zhou_DescribableTextures.json": "images",
                     "split_zhou_EuroSAT.json": "2750", "split_zhou_OxfordFlowers.json": "jpg", "split_zhou_Food101.json": "images",
                     "split_zhou_OxfordPets.json": "images", "split_zhou_StanfordCars.json": "",
                     "split_zhou_SUN397.json": "SUN397"}[split_file.name]
        gone += [split_file.parent / image_dir / rel for rel, _, _ in json.loads(split_file.read_text())["test"]]
    aircraft = root / "Aircraft"
    gone += [aircraft / "images" / f"{line.split()[0]}.jpg" for line in (aircraft / "images_variant_test.txt").read_text().splitlines() if line.strip()]
    gone += sorted((root / "MNIST" / "MNIST" / "raw").glob("t10k-*"))
    for f in gone:
        f.unlink()
    return len(gone)


__all__ = [
    "COOP_FOLDERS",
    "EUROSAT_SPLIT_NAMES",
    "RAIL_FOLDERS",
    "make_xtail_tree",
    "num_classes",
    "remove_test_images",
    "raw_class_names",
]

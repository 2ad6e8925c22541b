"""X-TAIL readers, benchmarks and the user YAML benchmark, on generated CoOp-layout fixture trees."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from xtail_fixture import (
    COOP_FOLDERS,
    EUROSAT_SPLIT_NAMES,
    make_xtail_tree,
    num_classes,
    raw_class_names,
)

from lada_core.benchmarks import DataError, get_benchmark
from lada_core.benchmarks.xtail import (
    EPOCHS_FEW_SHOT,
    EPOCHS_FULL_SHOT,
    ORDER_I,
    ORDER_II,
    READERS,
    packaged_classnames,
    read_dataset,
    xtail_tasks,
)

pytestmark = pytest.mark.unit

C, TRAIN, TEST = 3, 3, 2


@pytest.fixture(scope="module")
def xroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shared, read-only tiny X-TAIL (tests that damage a tree make their own)."""
    return make_xtail_tree(tmp_path_factory.mktemp("xtail"), C, TRAIN, TEST)


def expected_names(name: str) -> list[str]:
    if name == "MNIST":
        return MNIST_AUTHORS_NAMES
    if name == "EuroSAT":
        return [n + " satellite location" for n in EUROSAT_SPLIT_NAMES]
    return [n.replace("_", " ") for n in raw_class_names(name, C)]


# ------------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("name", ORDER_I)
def test_reader_classes_labels_and_sizes(xroot: Path, name: str) -> None:
    ds = read_dataset(name, xroot)
    k = num_classes(name, C)
    assert ds.class_names == expected_names(name)
    assert len(ds.train) == k * TRAIN and len(ds.test) == k * TEST  # val is not used
    for src, per in ((ds.train, TRAIN), (ds.test, TEST)):
        labels = np.asarray(src.labels)
        assert labels.dtype == np.int64
        assert np.array_equal(np.bincount(labels, minlength=k), np.full(k, per))
    assert ds.augment is (name not in ("MNIST", "EuroSAT"))
    img = ds.train.load(0)
    assert img.mode == "RGB" and img.size == ((28, 28) if name == "MNIST" else (16, 16))


def test_split_file_labels_map_to_files(xroot: Path) -> None:
    ds = read_dataset("DTD", xroot)
    # The fixture puts class c's images in a folder named after the class.
    for rel, y in zip(ds.train.paths, ds.train.labels.tolist(), strict=True):  # type: ignore[attr-defined]
        assert rel.split("/")[0] == raw_class_names("DTD", C)[y]


def test_aircraft_reads_variant_lists(xroot: Path) -> None:
    ds = read_dataset("Aircraft", xroot)
    assert ds.class_names == ["707-320", "A300B4", "F/A-18"]
    lines = (xroot / "Aircraft" / "images_variant_test.txt").read_text().splitlines()
    image_id, _, variant = lines[-1].partition(" ")
    assert not ds.test.opened  # type: ignore[attr-defined]  # the test split is opened on first use
    assert ds.class_names[int(ds.test.labels[-1])] == variant
    assert ds.test._get().paths[-1] == f"{image_id}.jpg"  # type: ignore[attr-defined]


MNIST_AUTHORS_NAMES = [
    f'number: "{i} - {w}"'
    for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
]


def test_packaged_classnames_are_the_authors() -> None:
    """The authors' readers (method page, section 7): MNIST as 'number: "0 - zero"', EuroSAT with
    ' satellite location' appended; the prompt then reads as theirs."""
    assert packaged_classnames("mnist") == MNIST_AUTHORS_NAMES
    assert packaged_classnames("eurosat") == [n + " satellite location" for n in EUROSAT_SPLIT_NAMES]
    assert packaged_classnames("eurosat")[0] == "Annual Crop Land satellite location"
    assert "a photo of a {}.".format(packaged_classnames("mnist")[0]) == 'a photo of a number: "0 - zero".'


def test_classnames_override_in_dataset_folder(tmp_path: Path) -> None:
    root = make_xtail_tree(tmp_path, 2, 2, 1)
    digits = [str(d) for d in range(10)]
    (root / "MNIST" / "classnames.txt").write_text("# bare digits\n" + "\n".join(digits) + "\n")
    assert read_dataset("MNIST", root).class_names == digits
    (root / "DTD" / "classnames.txt").write_text("striped\ndotted\n")
    assert read_dataset("DTD", root).class_names == ["striped", "dotted"]
    (root / "EuroSAT" / "classnames.txt").write_text("too\nfew\n")
    with pytest.raises(DataError, match=r"EuroSAT: .*classnames.txt lists 2 class names, the data has 10"):
        read_dataset("EuroSAT", root)


def test_mnist_gzip_and_rail_lowercase_names(tmp_path: Path) -> None:
    root = make_xtail_tree(tmp_path, C, TRAIN, TEST, rail_names=True, mnist_gzip=True)
    assert not (root / "DTD").exists() and (root / "dtd").is_dir()
    assert all(p.name.endswith(".gz") for p in (root / "mnist" / "MNIST" / "raw").iterdir())
    tasks = xtail_tasks(root, "I", shots=None, seed=1)
    assert [t.name for t in tasks] == list(ORDER_I)
    assert [t.num_classes for t in tasks] == [num_classes(n, C) for n in ORDER_I]


def test_mnist_raw_folder_variants(tmp_path: Path) -> None:
    root = make_xtail_tree(tmp_path, 2, 2, 1)
    raw = root / "MNIST" / "MNIST" / "raw"
    shutil.move(str(raw), str(root / "MNIST" / "raw"))  # <MNIST>/raw/ is accepted too
    assert len(read_dataset("MNIST", root).train) == 20


# ---------------------------------------------------------------------------------------- benchmarks


def test_xtail_full_shot_order_and_epochs(xroot: Path) -> None:
    b = get_benchmark("xtail", data_root=str(xroot), shots=None)
    assert b.task_names == list(ORDER_I)
    assert [t.epochs for t in b.tasks] == [EPOCHS_FULL_SHOT[n] for n in ORDER_I]
    assert [len(t.train) for t in b.tasks] == [num_classes(n, C) * TRAIN for n in ORDER_I]
    assert len(b.class_names) == sum(num_classes(n, C) for n in ORDER_I)
    assert EPOCHS_FULL_SHOT["SUN397"] == 2 and EPOCHS_FEW_SHOT["MNIST"] == 200


def test_xtail_order2(xroot: Path) -> None:
    b = get_benchmark("xtail-order2", data_root=str(xroot), shots=16)
    assert b.task_names == list(ORDER_II) == [
        "StanfordCars", "Aircraft", "OxfordPets", "Food101", "SUN397",
        "MNIST", "Flowers", "DTD", "Caltech101", "EuroSAT",
    ]
    assert [t.epochs for t in b.tasks] == [EPOCHS_FEW_SHOT[n] for n in ORDER_II]
    assert b.offsets[1] == num_classes("StanfordCars", C)


def test_few_shot_with_replacement_when_short(xroot: Path) -> None:
    tasks = xtail_tasks(xroot, "I", shots=16, seed=1)
    for t in tasks:
        assert len(t.train) == 16 * t.num_classes
        assert np.array_equal(t.class_counts(), np.full(t.num_classes, 16))
        idx = np.asarray(t.train.indices)  # type: ignore[attr-defined]
        assert len(np.unique(idx)) == t.num_classes * TRAIN  # every image drawn, some repeatedly
        assert len(t.test) == t.num_classes * TEST  # test is never sampled


def test_few_shot_deterministic_per_seed(xroot: Path) -> None:
    def picks(seed: int, rule: str = "seeded") -> list[list[int]]:
        return [np.asarray(t.train.indices).tolist() for t in xtail_tasks(xroot, "I", shots=2, seed=seed, sample_rule=rule)]  # type: ignore[attr-defined]

    a, b, c = picks(1), picks(1), picks(2)
    assert a == b and a != c
    assert picks(1, "authors") == picks(2, "authors")  # the authors' draw: random seeded 0 in each task
    for t in xtail_tasks(xroot, "I", shots=2, seed=1):  # no replacement when enough images
        idx = np.asarray(t.train.indices)  # type: ignore[attr-defined]
        assert len(np.unique(idx)) == len(idx) == 2 * t.num_classes
    # The same dataset gets the same sample in both orders.
    one = {t.name: t.train.fingerprint() for t in xtail_tasks(xroot, "I", shots=2, seed=3)}
    two = {t.name: t.train.fingerprint() for t in xtail_tasks(xroot, "II", shots=2, seed=3)}
    assert one == two


def test_epochs_override_and_bad_order(xroot: Path) -> None:
    tasks = xtail_tasks(xroot, ["DTD", "MNIST"], shots=None, seed=1, epochs={"DTD": 3})
    assert [(t.name, t.epochs) for t in tasks] == [("DTD", 3), ("MNIST", EPOCHS_FULL_SHOT["MNIST"])]
    with pytest.raises(DataError, match="unknown X-TAIL dataset 'Cifar'"):
        xtail_tasks(xroot, "I", shots=None, seed=1, epochs={"Cifar": 3})
    with pytest.raises(DataError, match="unknown X-TAIL order 'III'"):
        xtail_tasks(xroot, "III", shots=None, seed=1)


def test_xtail_needs_data_root() -> None:
    with pytest.raises(DataError, match="needs --data-root"):
        get_benchmark("xtail")


# -------------------------------------------------------------------------------------------- errors


def test_missing_dataset_folder_names_both_spellings(tmp_path: Path) -> None:
    root = make_xtail_tree(tmp_path, 2, 2, 1)
    shutil.rmtree(root / "Food")
    with pytest.raises(DataError) as err:
        get_benchmark("xtail", data_root=str(root), shots=None)
    msg = str(err.value)
    assert msg.startswith("Food101: dataset folder not found")
    assert str(root / "Food") in msg and str(root / "food-101") in msg


def test_missing_listed_image(tmp_path: Path) -> None:
    root = make_xtail_tree(tmp_path, 2, 2, 1)
    split = json.loads((root / "Pets" / "split_zhou_OxfordPets.json").read_text())
    first, second = split["test"][0][0], split["train"][1][0]
    (root / "Pets" / "images" / first).unlink()
    (root / "Pets" / "images" / second).unlink()
    with pytest.raises(DataError) as err:
        read_dataset("OxfordPets", root)
    msg = str(err.value)
    assert "OxfordPets: 1 image(s) listed in" in msg and "split_zhou_OxfordPets.json" in msg
    assert msg.endswith(f"first: {root / 'Pets' / 'images' / second}")  # train (and val) are checked at build


def test_missing_test_image_fails_only_when_the_test_split_is_opened(tmp_path: Path) -> None:
    """Tuning never opens the test split: a reader builds without its test images, and the first use
    of the test split names the missing file."""
    root = make_xtail_tree(tmp_path, 2, 2, 1)
    split = json.loads((root / "Pets" / "split_zhou_OxfordPets.json").read_text())
    first = split["test"][0][0]
    (root / "Pets" / "images" / first).unlink()
    (root / "MNIST" / "MNIST" / "raw" / "t10k-images-idx3-ubyte").unlink()
    pets, mnist = read_dataset("OxfordPets", root), read_dataset("MNIST", root)
    assert len(pets.train) == 4 and len(mnist.train) == 20
    with pytest.raises(DataError, match=rf"OxfordPets: 1 image\(s\) listed in .*first: {root / 'Pets' / 'images' / first}"):
        len(pets.test)
    with pytest.raises(DataError, match=r"MNIST: idx file t10k-images-idx3-ubyte"):
        mnist.test.fingerprint()


def test_missing_aircraft_image(tmp_path: Path) -> None:
    root = make_xtail_tree(tmp_path, 2, 2, 1)
    image_id = (root / "Aircraft" / "images_variant_train.txt").read_text().split()[0]
    (root / "Aircraft" / "images" / f"{image_id}.jpg").unlink()
    with pytest.raises(DataError, match=rf"Aircraft: 1 image\(s\) listed in .*images_variant_train.txt .*{image_id}.jpg"):
        read_dataset("Aircraft", root)


def test_missing_image_folder_and_idx(tmp_path: Path) -> None:
    root = make_xtail_tree(tmp_path, 2, 2, 1)
    shutil.rmtree(root / "DTD" / "images")
    with pytest.raises(DataError, match=r"DTD: image folder not found: .*DTD/images"):
        read_dataset("DTD", root)
    (root / "MNIST" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"MNIST: idx file t10k-labels-idx1-ubyte \(or .*\.gz\) not found"):
        len(read_dataset("MNIST", root).test)  # the test idx files are read on first use


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    root = make_xtail_tree(tmp_path, 2, 2, 1)
    ds = read_dataset("Caltech101", root)
    bad = root / "Caltech101" / "101_ObjectCategories" / ds.train.paths[0]  # type: ignore[attr-defined]
    bad.write_bytes(b"this is not a jpeg")
    task = xtail_tasks(root, ["Caltech101"], shots=None, seed=1)[0]
    with pytest.raises(DataError, match=rf"unreadable image {bad}"):
        task.train.load(0)


def test_malformed_split_file(tmp_path: Path) -> None:
    root = make_xtail_tree(tmp_path, 2, 2, 1)
    path = root / "Flowers" / "split_zhou_OxfordFlowers.json"
    path.write_text('{"train": [["a.jpg", "zero", "x"]], "test": []}')
    with pytest.raises(DataError, match=r"split_zhou_OxfordFlowers.json: train\[0\] is"):
        read_dataset("Flowers", root)
    path.write_text("{not json")
    with pytest.raises(DataError, match="Flowers: unreadable split file"):
        read_dataset("Flowers", root)


# ---------------------------------------------------------------------------------------- user YAML


def _image_folder(root: Path, classes: list[str], train: int, test: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for cname in classes:
            d = root / split / cname
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (root / "train" / classes[0] / "notes.txt").write_text("not an image")
    return root


def test_user_yaml_reader_folder_and_split_file(tmp_path: Path) -> None:
    xroot = make_xtail_tree(tmp_path / "xtail", 2, 2, 1)
    _image_folder(tmp_path / "bench" / "parts", ["bolt", "hex_nut"], train=3, test=2)
    (tmp_path / "bench" / "my_split.json").write_text(json.dumps({
        "train": [["a.jpg", 0, "red_car"], ["b.jpg", 1, "blue_car"]],
        "val": [],
        "test": [["c.jpg", 1, "blue_car"], ["d.jpg", 0, "red_car"]],
    }))
    (tmp_path / "bench" / "imgs").mkdir()
    for f in "abcd":
        shutil.copy(xroot / "DTD" / "images" / read_dataset("DTD", xroot).train.paths[0],  # type: ignore[attr-defined]
                    tmp_path / "bench" / "imgs" / f"{f}.jpg")
    cfg = tmp_path / "bench" / "seq.yaml"
    cfg.write_text(
        "name: mine\n"
        "default_epochs: 7\n"
        "datasets:\n"
        "  - reader: DTD\n"
        "  - reader: MNIST\n"
        "    root: ../xtail\n"
        "    epochs: 4\n"
        "  - {name: Parts, folder: parts, augment: false}\n"
        "  - {name: Cars2, split_file: my_split.json, image_dir: imgs, epochs: 2}\n"
    )
    b = get_benchmark(str(cfg), data_root=str(xroot), shots=None)
    assert b.name == "mine" and b.task_names == ["DTD", "MNIST", "Parts", "Cars2"]
    assert [t.epochs for t in b.tasks] == [EPOCHS_FULL_SHOT["DTD"], 4, 7, 2]
    assert [t.augment for t in b.tasks] == [True, False, False, True]
    parts, cars = b.tasks[2], b.tasks[3]
    assert parts.class_names == ["bolt", "hex nut"] and len(parts.train) == 6 and len(parts.test) == 4
    assert cars.class_names == ["red car", "blue car"] and cars.test.labels.tolist() == [1, 0]
    assert cars.test.load(0).mode == "RGB"
    few = get_benchmark(str(cfg), data_root=str(xroot), shots=4, seed=5)
    assert [len(t.train) for t in few.tasks] == [4 * t.num_classes for t in few.tasks]
    assert few.tasks[0].epochs == EPOCHS_FEW_SHOT["DTD"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("datasets: [reader: DTD\n", r"invalid YAML at line \d+, column \d+"),
        ("- reader: DTD\n", "expected a mapping with a 'datasets' list"),
        ("datasets: []\n", "'datasets' must be a non-empty list"),
        ("datasets:\n  - reader: DTD\nepoch: 3\n", "unknown key 'epoch' \\(allowed: name, description"),
        ("datasets:\n  - {reader: DTD, shots: 3}\n", r"datasets\[0\]: unknown key 'shots' for a reader entry"),
        ("datasets:\n  - {reader: Cifar}\n", r"datasets\[0\]: unknown reader 'Cifar' \(valid: Aircraft"),
        ("datasets:\n  - {folder: x}\n", r"datasets\[0\]: a folder entry needs a 'name'"),
        ("datasets:\n  - {name: a, folder: x, split_file: y}\n", "needs exactly one of 'reader', 'folder'"),
        ("datasets:\n  - {reader: DTD, epochs: -1}\n", "'epochs' must be a positive integer"),
        ("datasets:\n  - {reader: DTD, augment: maybe}\n", "'augment' must be true or false"),
        ("datasets:\n  - {name: a, folder: nowhere}\n", r"datasets\[0\].folder: path 'nowhere' not found"),
    ],
)
def test_user_yaml_errors(tmp_path: Path, xroot: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(DataError, match=message) as err:
        get_benchmark(str(cfg), data_root=str(xroot))
    assert "\n" not in str(err.value)


def test_user_yaml_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="benchmark file not found"):
        get_benchmark(str(tmp_path / "none.yaml"))


def test_registry_lists_xtail() -> None:
    from lada_core.benchmarks import benchmark_names

    assert {"xtail", "xtail-order2", "user-yaml"} <= set(benchmark_names())
    assert set(READERS) == set(ORDER_I) == set(COOP_FOLDERS)


def test_root_may_be_the_dataset_folder(xroot: Path) -> None:
    from lada_core.benchmarks.xtail import find_dataset_dir

    assert find_dataset_dir("DTD", xroot / "DTD") == xroot / "DTD"
    assert find_dataset_dir("Food101", xroot) == xroot / "Food"
    assert read_dataset("SUN397", xroot / "Sun397").class_names == expected_names("SUN397")

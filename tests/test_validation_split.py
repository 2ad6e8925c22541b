"""Validation splits (issue: honest tuning): every X-TAIL task and user sequence gets validation images
that are disjoint from its training shots, at most ``data.val_per_class`` per class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from xtail_fixture import make_xtail_tree

from lada_core.benchmarks import DataError, benchmark_for, get_benchmark
from lada_core.benchmarks.base import Subset, cap_per_class, hold_out_indices
from lada_core.config import build_config

pytestmark = pytest.mark.unit


def _base_indices(src: object) -> np.ndarray:
    assert isinstance(src, Subset)
    return np.asarray(src.indices)


@pytest.fixture(scope="module")
def xroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 3 classes, 12 train, 2 test and 5 val images per class (MNIST: 12 train per digit, no val list)
    return make_xtail_tree(tmp_path_factory.mktemp("xtail_val"), 3, 12, 2, val_per_class=5)


def test_every_xtail_task_has_a_capped_validation_split(xroot: Path) -> None:
    b = get_benchmark("xtail", data_root=str(xroot), shots=4, val_per_class=3)
    for t in b.tasks:
        assert t.val is not None, t.name
        counts = np.bincount(np.asarray(t.val.labels), minlength=t.num_classes)
        if t.name == "MNIST":  # held out of the pool: min(3, floor(12 * 0.1)) = 1 per digit
            assert counts.tolist() == [1] * 10
        else:  # the dataset's own val list (5 per class), capped at 3
            assert counts.tolist() == [3] * t.num_classes
            assert t.val.base is not t.train.base  # type: ignore[attr-defined]


def test_held_out_validation_never_shares_an_image_with_the_shots(xroot: Path) -> None:
    b = get_benchmark("xtail", data_root=str(xroot), shots=8, val_per_class=10, val_fraction=0.5)
    mnist = b.tasks[b.task_names.index("MNIST")]
    shots, val = _base_indices(mnist.train), _base_indices(mnist.val)
    assert not set(shots.tolist()) & set(val.tolist())
    assert np.bincount(np.asarray(mnist.val.labels), minlength=10).tolist() == [4] * 10  # 12 - 8 shots free, cap 6
    # the few-shot sample is the one drawn without a validation split (the authors' sample stays)
    plain = get_benchmark("xtail", data_root=str(xroot), shots=8, val_per_class=0)
    assert _base_indices(plain.tasks[b.task_names.index("MNIST")].train).tolist() == shots.tolist()
    assert all(t.val is None for t in plain.tasks)


def test_full_shot_held_out_images_leave_the_training_set(xroot: Path) -> None:
    b = get_benchmark("xtail", data_root=str(xroot), shots=None, val_per_class=2, val_fraction=0.5)
    mnist = b.tasks[b.task_names.index("MNIST")]
    train, val = set(_base_indices(mnist.train).tolist()), set(_base_indices(mnist.val).tolist())
    assert not train & val and len(train) + len(val) == 120 and len(val) == 20


def test_validation_draw_is_seeded_and_in_the_cache_key(xroot: Path) -> None:
    a = get_benchmark("xtail", data_root=str(xroot), shots=4, val_per_class=2, seed=1)
    b = get_benchmark("xtail", data_root=str(xroot), shots=4, val_per_class=2, seed=1)
    c = get_benchmark("xtail", data_root=str(xroot), shots=4, val_per_class=2, seed=2)
    assert a.spec() == b.spec() and a.spec() != c.spec()
    assert all("val" in t for t in a.spec()["tasks"])


def test_config_validation_settings() -> None:
    cfg = build_config()
    assert (cfg.data.val_per_class, cfg.data.val_fraction) == (10, 0.1)
    from lada_core.config import ConfigError

    with pytest.raises(ConfigError, match="val_fraction"):
        build_config(overrides=["data.val_fraction=1.5"])
    with pytest.raises(ConfigError, match="val_per_class"):
        build_config(overrides=["data.val_per_class=-1"])


def test_benchmark_for_reads_the_data_config(xroot: Path) -> None:
    cfg = build_config(overrides=["data.benchmark=xtail", f"data.data_root={xroot}", "data.shots=2", "data.val_per_class=1"])
    b = benchmark_for(cfg.data)
    assert all(len(t.val) == t.num_classes for t in b.tasks if t.val is not None)  # type: ignore[arg-type]


def _folder(root: Path, classes: list[str], **per_split: int) -> None:
    from PIL import Image

    for split, n in per_split.items():
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 20 % 255, 0, 0)).save(d / f"{i}.png")


def test_user_yaml_val_folder_split_key_and_fraction(tmp_path: Path) -> None:
    _folder(tmp_path / "withval", ["a", "b"], train=4, val=2, test=1)
    _folder(tmp_path / "noval", ["a", "b"], train=10, test=1)
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    for f in "abcdef":
        Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / f"{f}.png")
    (tmp_path / "s.json").write_text(json.dumps({
        "train": [["a.png", 0, "x"], ["b.png", 1, "y"]],
        "val": [["c.png", 0, "x"], ["d.png", 1, "y"]],
        "test": [["e.png", 0, "x"], ["f.png", 1, "y"]],
    }))
    seq = tmp_path / "seq.yaml"
    seq.write_text(
        "val_fraction: 0.2\n"
        "datasets:\n"
        "  - {name: WithVal, folder: withval}\n"
        "  - {name: NoVal, folder: noval}\n"
        "  - {name: NoValHalf, folder: noval, val_fraction: 0.5}\n"
        "  - {name: Split, split_file: s.json, image_dir: imgs}\n"
    )
    b = get_benchmark(str(seq))
    withval, noval, half, split = b.tasks
    assert withval.val is not None and len(withval.val) == 4 and len(withval.train) == 8
    assert noval.val is not None and len(noval.val) == 4 and len(noval.train) == 16  # floor(10 * 0.2) per class
    assert half.val is not None and len(half.val) == 10 and len(half.train) == 10
    assert split.val is not None and sorted(split.val.base.paths) == ["c.png", "d.png"]  # type: ignore[attr-defined]
    seq.write_text("val_fraction: 2\ndatasets:\n  - {name: NoVal, folder: noval}\n")
    with pytest.raises(DataError, match="val_fraction' must be a number in"):
        get_benchmark(str(seq))


def test_hold_out_and_cap_helpers_by_hand() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    held = hold_out_indices(labels, per_class=3, fraction=0.5, seed=0, exclude=np.array([0, 1, 2]))
    assert held[0] == 3 and len(held) == 4 and (labels[held] == 1).sum() == 3  # class 0: only image 3 is free
    capped = cap_per_class(labels, 2, seed=0)
    assert np.bincount(labels[capped]).tolist() == [2, 2]

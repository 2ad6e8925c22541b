"""End to end on a complete tiny X-TAIL (all ten readers, generated in the CoOp layout): ``lada-cache``
then ``lada-train`` with the tiny model; exact mode (``--no-cache``) on a small sequence; and bad data
(a split file naming a missing image, an unreadable image) failing with one line naming the file."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from xtail_fixture import make_xtail_tree, num_classes, remove_test_images

from lada_core.benchmarks.xtail import ORDER_I
from lada_core.cli import cache_main, train_main
from lada_core.features import bundle_splits, load_bundle

pytestmark = pytest.mark.e2e

C, TRAIN, TEST = 2, 2, 1
N_CLASSES = sum(num_classes(d, C) for d in ORDER_I)  # MNIST and EuroSAT keep their ten classes


@pytest.fixture(scope="module")
def xroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_xtail_tree(tmp_path_factory.mktemp("xtail"), C, TRAIN, TEST)


def tiny(cache_root: Path) -> list[str]:
    sets = [
        "backbone.model=lada-tiny", "backbone.pretrained=null", "data.views=1", "data.device=cpu",
        "train.device=cpu", "optim.epochs=2", "lada.kmeans_n_init=1", "lada.memory_size=2",
    ]
    return ["--cache-root", str(cache_root), "--quiet", *[a for s in sets for a in ("--set", s)]]


def read_matrix(out: Path) -> tuple[list[str], np.ndarray]:
    with open(out / "matrix.csv", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0][1:], np.array([[float(v) for v in r[1:]] for r in rows[1:]])


def error_lines(err: str, prog: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]


def test_xtail_through_lada_cache_and_lada_train(xroot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import lada_core.trainer as trainer

    args = ["--benchmark", "xtail", "--data-root", str(xroot), "--shots", "full", *tiny(tmp_path / "cache")]
    assert cache_main(args) == 0
    cache = Path(capsys.readouterr().out.strip().splitlines()[-1])
    bundle = load_bundle(cache)
    assert bundle.task_names == list(ORDER_I) and len(bundle.class_names) == N_CLASSES
    assert [t.train.shape[0] for t in bundle.tasks] == [num_classes(d, C) * TRAIN for d in ORDER_I]
    # Views: RandomResizedCrop datasets get 1 + 1, MNIST and EuroSAT only the test-transform view.
    assert {t.name: t.train.shape[1] for t in bundle.tasks if t.train.shape[1] == 1} == {"EuroSAT": 1, "MNIST": 1}

    # Every evaluation scores against the union of all class names of the ten datasets.
    seen_widths: list[int] = []
    real_accuracy = trainer.accuracy

    def spy(features, labels, offset, st, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen_widths.append(int(st.text_zeroshot.shape[0]))
        return real_accuracy(features, labels, offset, st, *a, **kw)

    monkeypatch.setattr(trainer, "accuracy", spy)
    out = tmp_path / "run"
    assert train_main([*args, "--output", str(out)]) == 0
    names, matrix = read_matrix(out)
    assert names == list(ORDER_I) and matrix.shape == (10, 10)
    assert ((matrix >= 0) & (matrix <= 100)).all()
    assert seen_widths and set(seen_widths) == {N_CLASSES} and len(seen_widths) == 10 * 10
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task_names"] == list(ORDER_I)
    # lada-train (train + test, as the paper reports) reused the cache: no other folder appeared.
    assert {p.name for p in cache.parent.iterdir()} == {cache.name, *(p.name for p in bundle_splits(cache).values())}


def write_yaml(path: Path, root: Path, readers: list[str]) -> Path:
    lines = ["name: small-xtail", "datasets:"] + [f"  - reader: {r}\n    root: {root}\n    epochs: 2" for r in readers]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_exact_mode_runs_and_writes_a_matrix(xroot: Path, tmp_path: Path) -> None:
    bench = write_yaml(tmp_path / "small.yaml", xroot, ["DTD", "EuroSAT"])
    out, cache_root = tmp_path / "exact", tmp_path / "cache"
    assert train_main(["--benchmark", str(bench), "--shots", "full", "--no-cache", *tiny(cache_root), "--output", str(out)]) == 0
    names, matrix = read_matrix(out)
    assert names == ["DTD", "EuroSAT"] and matrix.shape == (2, 2) and np.isfinite(matrix).all()
    assert not cache_root.exists() or not any(cache_root.iterdir())  # exact mode builds no cache


def _copy_dtd(xroot: Path, dst: Path) -> Path:
    shutil.copytree(xroot / "DTD", dst / "DTD")
    return dst


def test_split_file_naming_a_missing_image(xroot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy_dtd(xroot, tmp_path / "data")
    split = root / "DTD" / "split_zhou_DescribableTextures.json"
    data = json.loads(split.read_text())
    data["train"][1][0] = "banded/not_there.jpg"
    split.write_text(json.dumps(data))
    bench = write_yaml(tmp_path / "b.yaml", root, ["DTD"])
    base = ["--benchmark", str(bench), "--shots", "full", *tiny(tmp_path / "cache")]
    for prog, main, extra in (("lada-cache", cache_main, []), ("lada-train", train_main, ["--output", str(tmp_path / "o")]),
                              ("lada-train", train_main, ["--no-cache", "--output", str(tmp_path / "o2")])):
        capsys.readouterr()
        assert main([*base, *extra]) == 2
        (line,) = error_lines(capsys.readouterr().err, prog)
        assert str(root / "DTD" / "images" / "banded" / "not_there.jpg") in line


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image(xroot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: int) -> None:
    root = _copy_dtd(xroot, tmp_path / "data")
    data = json.loads((root / "DTD" / "split_zhou_DescribableTextures.json").read_text())
    bad = root / "DTD" / "images" / data["train"][2][0]
    bad.write_bytes(b"this is not a JPEG file")
    bench = write_yaml(tmp_path / "b.yaml", root, ["DTD"])
    base = ["--benchmark", str(bench), "--shots", "full", *tiny(tmp_path / "cache")]
    capsys.readouterr()
    assert cache_main([*base, "--workers", str(workers)]) == 2  # workers=1: raised in a DataLoader process
    (line,) = error_lines(capsys.readouterr().err, "lada-cache")
    assert str(bad) in line and "unreadable image" in line
    assert not any((tmp_path / "cache").rglob("manifest.json"))
    if workers == 0:
        for extra in ([], ["--no-cache"]):
            capsys.readouterr()
            assert train_main([*base, *extra, "--output", str(tmp_path / f"o{len(extra)}")]) == 2
            (line,) = error_lines(capsys.readouterr().err, "lada-train")
            assert str(bad) in line


def test_tuning_on_val_reads_no_test_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``eval.split=val`` (what every sweep trial runs): the cache, the training and the evaluation never
    open a test image, a test idx file or a test feature. Counted at the readers: every image file
    opened, every idx file read, every lazy test split opened, every cache array memory-mapped."""
    import numpy as np_

    import lada_core.benchmarks.base as base
    import lada_core.benchmarks.xtail as xtail
    from lada_core.cli import train
    from lada_core.config import build_config

    root = make_xtail_tree(tmp_path / "x", C, 10, 2, val_per_class=2)
    tests = {str(p) for p in _test_files(root)}
    opened: list[str] = []
    lazy_opened: list[str] = []
    real_load, real_idx, real_get, real_np_load = base.FileImages.load, xtail.read_idx, base.LazyImages._get, np_.load

    def load(self, index):  # noqa: ANN001, ANN202
        opened.append(str(Path(self.root) / self.paths[index]))
        return real_load(self, index)

    def idx(path):  # noqa: ANN001, ANN202
        opened.append(str(path))
        return real_idx(path)

    def get(self):  # noqa: ANN001, ANN202
        lazy_opened.append(self.what)
        return real_get(self)

    def np_load(path, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        opened.append(str(path))
        return real_np_load(path, *a, **kw)

    monkeypatch.setattr(base.FileImages, "load", load)
    monkeypatch.setattr(xtail, "read_idx", idx)
    monkeypatch.setattr(base.LazyImages, "_get", get)
    monkeypatch.setattr(np_, "load", np_load)
    sets = [s for s in tiny(tmp_path / "cache")[3:] if s != "--set"] + [f"data.cache_root={tmp_path / 'cache'}"]
    cfg = build_config(overrides=[*sets, "data.benchmark=xtail", f"data.data_root={root}", "data.shots=null", "eval.split=val"])
    result = train(cfg, tmp_path / "run", quiet=True)
    assert result.matrix.shape == (10, 10)
    assert any("train" in p for p in opened) and any("val.emb.npy" in p for p in opened)  # the counters do count
    assert lazy_opened == [], lazy_opened
    assert not [p for p in opened if p in tests or "t10k" in p or Path(p).name.startswith("test")], opened
    assert not list((tmp_path / "cache").glob("*/*/test*")), "no test split was encoded"
    # The same run with the test images gone from disk gives the same matrix.
    remove_test_images(root)
    again = train(cfg, tmp_path / "run2", quiet=True)
    np.testing.assert_array_equal(again.matrix, result.matrix)


def test_peek_test_adds_test_metrics_beside_the_validation_ones(tmp_path: Path) -> None:
    """``eval.peek_test`` with ``eval.split=val``: the matrix stays on validation data; each step also
    carries ``test/...`` metrics, which are the test matrix's."""
    from lada_core.cli import train
    from lada_core.config import build_config

    root = make_xtail_tree(tmp_path / "x", C, 10, 2, val_per_class=2)
    bench = write_yaml(tmp_path / "b.yaml", root, ["DTD", "MNIST", "Flowers"])
    sets = [s for s in tiny(tmp_path / "cache")[3:] if s != "--set"] + [f"data.cache_root={tmp_path / 'cache'}"]
    base = [*sets, f"data.benchmark={bench}", "data.shots=null"]
    steps: list = []
    peeked = train(build_config(overrides=[*base, "eval.split=val", "eval.peek_test=true"]), tmp_path / "p", quiet=True, on_task_end=steps.append)
    val = train(build_config(overrides=[*base, "eval.split=val"]), tmp_path / "v", quiet=True)
    test = train(build_config(overrides=[*base, "eval.split=test"]), tmp_path / "t", quiet=True)
    np.testing.assert_array_equal(peeked.matrix, val.matrix)  # peeking changes nothing that is tuned on
    last = steps[-1].peek
    assert last["test/average"] == pytest.approx(test.summary["average"]) and last["test/last"] == pytest.approx(test.summary["last"])
    assert last["test/acc/Flowers"] == pytest.approx(test.matrix[-1, 2])
    assert all(k.startswith("test/") for s in steps for k in s.peek) and not any(k.startswith("test/") for k in steps[-1].metrics)


def _test_files(root: Path) -> list[Path]:
    """The test files of a fixture tree (what :func:`remove_test_images` deletes), without deleting."""
    import shutil as sh

    copy = root.parent / (root.name + "-probe")
    sh.copytree(root, copy)
    before = {p.relative_to(copy) for p in copy.rglob("*") if p.is_file()}
    remove_test_images(copy)
    after = {p.relative_to(copy) for p in copy.rglob("*") if p.is_file()}
    sh.rmtree(copy)
    return [root / p for p in before - after]

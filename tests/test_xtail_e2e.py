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
from xtail_fixture import make_xtail_tree, num_classes

from lada_core.benchmarks.xtail import ORDER_I
from lada_core.cli import cache_main, train_main
from lada_core.features import load_bundle

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
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]  # lada-train reused the cache


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

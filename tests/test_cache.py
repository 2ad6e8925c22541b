"""The feature cache: content-addressed keys, layout, memory-mapped bundles, ``lada-cache --check`` on
damaged caches, resumption after SIGKILL (byte-identical to an uninterrupted build), bounded memory,
and the Ray fan-out (same bytes as the local runner).

The benchmarks are small generated image folders described by a user YAML (``folder`` entries), so
every build takes a second or two with the tiny random-init model.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lada_core.cli import cache_main
from lada_core.features import CacheError, bundle_splits, load_bundle
from lada_core.features.cache import BUNDLE, MANIFEST, build_cache, check_cache, quick_check

ROOT = Path(__file__).resolve().parent.parent
VIEWS, CLASSES, TRAIN, TEST, D = 2, 2, 6, 2, 32  # lada-tiny: embed_dim 32


def make_folder_benchmark(root: Path, tasks: int = 2, classes: int = CLASSES, train: int = TRAIN, test: int = TEST, size: int = 12, seed: int = 0) -> Path:
    """``tasks`` ImageFolder-style datasets (``train/<class>/*.png``, ``test/<class>/*.png``) and a
    user-benchmark YAML listing them; returns the YAML path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    lines = ["name: tiny-folders", "default_epochs: 2", "datasets:"]
    for t in range(tasks):
        for split, n in (("train", train), ("test", test)):
            for c in range(classes):
                d = root / f"set{t}" / split / f"class_{t}_{c}"
                d.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"img{i:03d}.png")
        lines += [f"  - name: set{t}", f"    folder: set{t}"]
    path = root / "bench.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def cache_args(bench: Path, cache_root: Path, *extra: str, views: int = VIEWS, shard_rows: int = 6) -> list[str]:
    return [
        "--benchmark", str(bench), "--shots", "full", "--cache-root", str(cache_root),
        "--set", "backbone.model=lada-tiny", "--set", "backbone.pretrained=null",
        "--views", str(views), "--set", f"data.shard_rows={shard_rows}", "--device", "cpu", "--quiet", *extra,
    ]


def build(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[Path, str]:
    """Run ``lada-cache`` in-process; return (cache folder printed on stdout, stderr)."""
    capsys.readouterr()
    assert cache_main(args) == 0
    out, err = capsys.readouterr()
    return Path(out.strip().splitlines()[-1]), err


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder_benchmark(tmp_path_factory.mktemp("folders"))


@pytest.fixture(scope="module")
def built(bench: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished cache (tests that damage a cache work on copies)."""
    root = tmp_path_factory.mktemp("cache")
    assert cache_main(cache_args(bench, root)) == 0
    (path,) = [p for p in root.iterdir() if (p / BUNDLE).is_file()]
    assert sorted(bundle_splits(path)) == ["test", "train"]  # no val/ folders, too few images to hold out
    return path


def damaged_copy(built: Path, tmp_path: Path) -> Path:
    """A copy of the whole cache root; returns the copied bundle."""
    shutil.copytree(built.parent, tmp_path / "caches")
    return tmp_path / "caches" / built.name


def split_dir(bundle: Path, split: str) -> Path:
    return bundle_splits(bundle)[split]


# ----------------------------------------------------------------------------------------- the key


@pytest.mark.integration
def test_same_inputs_reuse_and_changed_inputs_get_new_keys(bench: Path, built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache_root = built.parent
    path, err = build(capsys, cache_args(bench, cache_root))
    assert path == built and "reusing" in err and "building" not in err

    # Execution details are not part of the key: another batch size or shard size reuses the cache.
    path, err = build(capsys, cache_args(bench, cache_root, "--batch-size", "3", shard_rows=9))
    assert path == built and "reusing" in err

    other_model = tmp_path / "models"
    other_model.mkdir()
    cfg = json.loads((ROOT / "lada_core" / "data" / "models" / "lada-tiny.json").read_text())
    cfg["vision_cfg"]["layers"] = 2
    (other_model / "lada-tiny-b.json").write_text(json.dumps(cfg))
    variants = {
        "views": cache_args(bench, cache_root, views=1),
        "shots": cache_args(bench, cache_root, "--shots", "3"),
        "model": cache_args(bench, cache_root, "--set", "backbone.model=lada-tiny-b", "--set", f"backbone.model_config_dir={other_model}"),
        "seed": cache_args(bench, cache_root, "--set", "data.sample_seed=7"),
    }
    keys = {built.name}
    test_key = split_dir(built, "test").name
    for what, args in variants.items():
        path, err = build(capsys, args)
        assert "building" in err, what
        assert path.parent == cache_root and path.name not in keys, what
        keys.add(path.name)
        assert json.loads((path / BUNDLE).read_text())["key"] == path.name
        for folder in bundle_splits(path).values():
            assert json.loads((folder / MANIFEST).read_text())["key"] == folder.name
        # Each split has its own key: views, shots and the seed change the training split only, so
        # the test features are reused (not encoded again); another model changes every split.
        assert (split_dir(path, "test").name == test_key) == (what != "model"), what
        assert ("reusing" in err and "test" in err) == (what != "model"), what


# ------------------------------------------------------------------------------ layout and bundle


def test_manifest_shards_arrays_and_memory_mapped_bundle(built: Path) -> None:
    b = json.loads((built / BUNDLE).read_text())
    assert b["views"] == VIEWS and b["embed_dim"] == D and [t["name"] for t in b["tasks"]] == ["set0", "set1"]
    train_dir, test_dir = split_dir(built, "train"), split_dir(built, "test")
    m = json.loads((train_dir / MANIFEST).read_text())
    mt = json.loads((test_dir / MANIFEST).read_text())
    assert (m["split"], mt["split"]) == ("train", "test") and "test" not in m["tasks"][0] and "train" not in mt["tasks"][0]
    n, vps = CLASSES * TRAIN, VIEWS + 1
    for t, tt in zip(m["tasks"], mt["tasks"]):
        tr, te = t["train"], tt["test"]
        assert (tr["samples"], tr["rows"], tr["views_per_sample"]) == (n, n * vps, vps)
        assert (te["samples"], te["rows"], te["views_per_sample"]) == (CLASSES * TEST, CLASSES * TEST, 1)
        assert sum(s["rows"] for s in tr["shards"]) == tr["rows"] and len(tr["shards"]) == n * vps // 6
        for folder, s in [(train_dir, s) for s in tr["shards"]] + [(test_dir, s) for s in te["shards"]]:
            assert (folder / s["file"]).is_file() and s["rows"] <= 6
        assert not list(built.parent.rglob("*.tmp*"))

    bundle = load_bundle(built)
    assert bundle.class_names == ["class 0 0", "class 0 1", "class 1 0", "class 1 1"]  # "_" -> space
    for t in bundle.tasks:
        assert t.train.shape == (n, vps, D) and t.test.shape == (CLASSES * TEST, D)
        for arr in (t.train, t.test):
            assert isinstance(arr, np.memmap) and not arr.flags.owndata and not arr.flags.writeable
        assert t.train.dtype == np.float16 and np.isfinite(t.train).all()
        assert np.array_equal(t.train_labels, np.repeat(np.arange(CLASSES), TRAIN))
        assert np.array_equal(t.test_labels, np.repeat(np.arange(CLASSES), TEST))
        # Views differ (augmented), view 0 is the deterministic test transform of the same image.
        assert not np.array_equal(t.train[:, 1], t.train[:, 2])

    # The arrays hold exactly the shards' rows.
    from lada_core.features.cache import read_shard

    s0 = m["tasks"][0]["train"]["shards"][1]
    emb, meta = read_shard(train_dir / s0["file"], s0["rows"])
    flat = np.asarray(bundle.tasks[0].train).reshape(-1, D)
    assert np.array_equal(flat[6:12], emb) and np.array_equal(meta[:, 0], np.arange(6, 12) // vps)


@pytest.mark.integration
def test_each_split_is_encoded_only_when_asked_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bundle of train and val only (what a sweep tunes on) builds with every test image deleted:
    no test folder is listed, no test image opened, no test split encoded; the test split is added
    later under its own key, the train and val splits reused."""
    bench = make_folder_benchmark(tmp_path / "data", train=10)
    for t in range(2):  # 10 train images per class, val_fraction 0.5 holds 5 out
        shutil.move(str(tmp_path / "data" / f"set{t}" / "test"), str(tmp_path / f"test{t}"))
    root = tmp_path / "cache"
    tuned, err = build(capsys, cache_args(bench, root, "--splits", "train,val", "--set", "data.val_fraction=0.5"))
    assert sorted(bundle_splits(tuned)) == ["train", "val"] and len([p for p in root.iterdir()]) == 3
    b = load_bundle(tuned)
    assert all(t.test is None and t.val is not None and t.val.shape == (CLASSES * 5, D) for t in b.tasks)
    with pytest.raises(CacheError, match="no 'test' features"):
        b.tasks[0].eval_split("test")
    capsys.readouterr()
    assert cache_main(cache_args(bench, root, "--splits", "train,test", "--set", "data.val_fraction=0.5")) == 1
    assert "image folder needs train/<class>/ and test/<class>/" in capsys.readouterr().err  # opened only now
    for t in range(2):
        shutil.move(str(tmp_path / f"test{t}"), str(tmp_path / "data" / f"set{t}" / "test"))
    full, err = build(capsys, cache_args(bench, root, "--set", "data.val_fraction=0.5"))  # default: every split
    assert bundle_splits(full)["train"] == bundle_splits(tuned)["train"] and bundle_splits(full)["val"] == bundle_splits(tuned)["val"]
    assert err.count("reusing") == 2 and "building test" in err
    assert load_bundle(full).tasks[1].test.shape == (CLASSES * TEST, D)  # type: ignore[union-attr]


def test_encoding_progress_off_a_terminal_is_a_few_plain_lines(bench: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``lada-cache`` (and ``lada-train``, which builds its cache the same way) without ``--quiet``,
    its standard error a pipe or a log: one plain line at each quarter of the images, no tqdm
    carriage-return updates."""
    args = [a for a in cache_args(bench, tmp_path / "cache", "--batch-size", "2") if a != "--quiet"]
    _, err = build(capsys, args)
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("encoding: ")]
    assert len(lines) == 3 and all(" images in " in line for line in lines), err
    done = [int(line.split()[1].split("/")[0]) for line in lines]
    total = int(lines[0].split()[1].split("/")[1])
    assert done == sorted(done) and all(0 < k < total for k in done), lines


# ------------------------------------------------------------------------------------------ --check


def _check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cache_main(["--check", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_check_sound_cache_and_cache_root(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _check(built, capsys)
    assert rc == 0 and "ok" in out and not err
    assert check_cache(built.parent) == []  # a cache root: every cache in it is checked


def test_truncated_shard(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = damaged_copy(built, tmp_path)
    shard = split_dir(cache, "train") / "set1" / "train-00002.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    rc, _, err = _check(cache, capsys)
    assert rc == 1 and str(shard) in err and "1 problem" in err
    with pytest.raises(CacheError, match="truncated") as exc:
        load_bundle(cache)
    assert str(shard) in str(exc.value)


def test_flipped_byte_in_array_is_caught_by_check_and_on_reuse(bench: Path, built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = damaged_copy(built, tmp_path)
    arr = split_dir(cache, "train") / "set0" / "train.emb.npy"
    data = bytearray(arr.read_bytes())
    data[-7] ^= 0x10
    arr.write_bytes(bytes(data))
    rc, _, err = _check(cache, capsys)
    assert rc == 1 and f"hash mismatch in array {arr}" in err
    # Reuse through lada-cache / ensure_cache verifies the arrays' hashes: never silently used.
    capsys.readouterr()
    assert cache_main(cache_args(bench, cache.parent)) == 1
    err = capsys.readouterr().err
    assert f"corrupt cache file {arr}" in err and len(err.strip().splitlines()) == 1
    # load_bundle alone only checks structure (documented): the bit flip passes its quick check.
    quick_check(split_dir(cache, "train"))


def test_flipped_byte_in_shard(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = damaged_copy(built, tmp_path)
    shard = split_dir(cache, "test") / "set0" / "test-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    rc, _, err = _check(cache, capsys)
    assert rc == 1 and str(shard) in err


def test_missing_shard(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = damaged_copy(built, tmp_path)
    shard = split_dir(cache, "train") / "set0" / "train-00001.parquet"
    shard.unlink()
    rc, _, err = _check(cache, capsys)
    assert rc == 1 and f"missing shard {shard}" in err
    with pytest.raises(CacheError, match="missing"):
        load_bundle(cache)


def test_missing_manifest_is_an_incomplete_cache(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = damaged_copy(built, tmp_path)
    (split_dir(cache, "train") / MANIFEST).unlink()
    rc, _, err = _check(cache, capsys)
    assert rc == 1 and "incomplete feature cache" in err and str(split_dir(cache, "train")) in err and MANIFEST in err
    with pytest.raises(CacheError, match="incomplete"):
        load_bundle(cache)


def test_truncated_array_is_caught_on_load(built: Path, tmp_path: Path) -> None:
    cache = damaged_copy(built, tmp_path)
    arr = split_dir(cache, "test") / "set1" / "test.emb.npy"
    arr.write_bytes(arr.read_bytes()[:-10])
    with pytest.raises(CacheError) as exc:
        load_bundle(cache)
    assert str(arr) in str(exc.value)
    assert any(str(arr) in p for p in check_cache(cache))


def test_check_of_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _check(tmp_path / "nope", capsys)
    assert rc == 1 and "nope" in err


# ---------------------------------------------------------------------------------------- resume


@pytest.mark.e2e
def test_sigkill_then_rerun_gives_the_uninterrupted_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Kill ``lada-cache`` (the sweeps console script, a subprocess) once some shards are written;
    rerunning it finishes the cache, byte for byte the same as an uninterrupted build elsewhere."""
    bench = make_folder_benchmark(tmp_path / "data", train=8, test=3)
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    args = cache_args(bench, killed_root, shard_rows=3)  # one image (x 3 views) per shard: 36 shards
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sweeps.cache_cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if any(killed_root.rglob("*.parquet")):
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not list(killed_root.rglob(MANIFEST)) and not list(killed_root.rglob(BUNDLE))
    done = len(list(killed_root.rglob("*.parquet")))
    assert 0 < done < 2 * (2 * 8 + 2)

    cache, err = build(capsys, args)
    assert f"resuming ({done} shards already done)" in err
    clean, _ = build(capsys, cache_args(bench, clean_root, shard_rows=3))
    assert clean.name == cache.name
    a, b = tree_bytes(killed_root), tree_bytes(clean_root)
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)
    assert check_cache(cache) == []


def test_resume_ignores_a_shard_of_another_layout(bench: Path, built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A leftover shard whose rows differ (another shard size) is re-encoded, never reused."""
    cache = damaged_copy(built, tmp_path)
    train = split_dir(cache, "train")
    (train / MANIFEST).unlink()
    for p in train.rglob("*.npy"):
        p.unlink()
    # Pretend shard 1 of set0 came from a build with another layout: rename shard 3 onto it.
    os.replace(train / "set0" / "train-00003.parquet", train / "set0" / "train-00001.parquet")
    (train / "set0" / "train-00001.parquet.tmp-somehost-1").write_bytes(b"partial")  # a killed writer's leftover
    path, err = build(capsys, cache_args(bench, cache.parent))
    assert path == cache and "resuming" in err
    assert filecmp.cmp(train / MANIFEST, split_dir(built, "train") / MANIFEST, shallow=False)
    assert not list(cache.parent.rglob("*.tmp-*"))


# ------------------------------------------------------------------------------------ bounded memory


class _WideBackbone:
    """A stand-in encoder with a wide output (D = 2048) and trivial transforms, so that a whole-dataset
    array would dwarf one shard: 8,000 rows x 2048 x 2 bytes = 33 MB, one shard of 256 rows = 1 MB."""

    embed_dim = 2048
    transform_desc = "wide-test-backbone"

    def __init__(self) -> None:
        import torch

        self.proj = torch.randn(3 * 8 * 8, self.embed_dim, generator=torch.Generator().manual_seed(0))
        self.model = self

    def encode_image(self, pixels):  # noqa: ANN001, ANN201 - torch in, torch out
        return pixels.flatten(1) @ self.proj

    def to(self, device):  # noqa: ANN001, ANN201
        return self

    @staticmethod
    def _tf(img):  # noqa: ANN001, ANN205
        import torch

        return torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)

    train_transform = test_transform = plain_transform = _tf


def _wide_benchmark(n: int, tag: str):  # noqa: ANN202
    from lada_core.benchmarks.base import ArrayImages, Benchmark, Task

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(n) % 4
    src, test_src = ArrayImages(pixels, labels, origin=tag), ArrayImages(pixels[:64], labels[:64], origin=tag + "-test")
    return Benchmark("wide", [Task("wide", ["a", "b", "c", "d"], src, test_src, epochs=1, augment=False)])


@pytest.mark.integration
def test_extraction_streams_shard_by_shard(tmp_path: Path) -> None:
    """Peak Python/numpy memory of a whole build (encode + consolidate) stays near one shard (1 MB)
    plus fixed costs (a few MB, whatever the size): far below the 33 MB a whole-dataset array takes."""
    import tracemalloc

    bb = _WideBackbone()
    kw = {"views": 0, "shard_rows": 256, "batch_size": 128, "device": "cpu", "backbone": bb, "progress": False, "log": lambda m: None}
    build_cache(_wide_benchmark(300, "warm-up"), "wide", None, tmp_path / "warm", **kw)  # imports happen outside the trace
    n = 8000
    bench = _wide_benchmark(n, "stream-test")
    tracemalloc.start()
    try:
        info = build_cache(bench, "wide", None, tmp_path / "big", **kw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = n * bb.embed_dim * 2
    assert peak < total / 4, f"peak traced memory {peak / 1e6:.1f} MB for a {total / 1e6:.1f} MB cache"
    t = load_bundle(info.path).tasks[0]
    assert t.train.shape == (n, 1, bb.embed_dim) and t.train.nbytes == total
    assert np.isfinite(np.asarray(t.train[-5:], dtype=np.float32)).all()


# -------------------------------------------------------------------------------------------- Ray


@pytest.mark.e2e
def test_cache_cli_without_ray_never_imports_ray(built: Path) -> None:
    code = (
        "import sys; from sweeps.cache_cli import main; rc = main(['--check', sys.argv[1]]); "
        "assert 'ray' not in sys.modules, 'ray imported'; sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(built)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.integration
def test_ray_fan_out_builds_the_same_cache(bench: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two CPU encoder actors on a local Ray (one CPU, one torch thread each) against the local runner
    with one torch thread: the same manifest, the same bytes, although one encoder dies on its first
    shard job (the fault seam ``cache.encode``) and its jobs go to the other. (Float results depend on
    the CPU thread count, so the comparison holds the numeric set-up fixed.)"""
    import ray  # the sweep extra is always installed in CI: no skip
    import torch

    from sweeps import faults
    from sweeps.cache_cli import main as cli_main

    log = tmp_path / "faults.jsonl"
    monkeypatch.setenv(faults.PLAN_ENV, json.dumps({"cache.encode": {"exit": 1, "once": str(tmp_path / "died")}}))
    monkeypatch.setenv(faults.LOG_ENV, str(log))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        capsys.readouterr()
        assert cli_main(cache_args(bench, tmp_path / "ray", "--ray", "--ray-cpus-per-worker", "1")) == 0
        out, err = capsys.readouterr()
        assert "on 2 Ray encoder(s)" in err, err
        ray_cache = Path(out.strip().splitlines()[-1])
    finally:
        ray.shutdown()
    assert len(faults.fired(log, "cache.encode")) == 1, log.read_text() if log.exists() else "no fault fired"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local_cache, _ = build(capsys, cache_args(bench, tmp_path / "local"))
    finally:
        torch.set_num_threads(threads)
    assert ray_cache.name == local_cache.name
    assert tree_bytes(ray_cache.parent) == tree_bytes(local_cache.parent)
    assert check_cache(ray_cache) == []


@pytest.mark.integration
def test_ray_runner_reports_the_users_error(tmp_path: Path) -> None:
    """A DataError raised inside an actor reaches the caller as itself (one line naming the file)."""
    import ray  # noqa: F401
    import ray.exceptions

    from lada_core.benchmarks.base import DataError
    from sweeps.ray_cache import _unwrap

    cause = DataError(f"unreadable image {tmp_path / 'x.jpg'}: cannot identify image file")
    wrapped = ray.exceptions.RayTaskError("encode", "Traceback ...\nDataError: ...", cause)
    assert _unwrap(wrapped) is cause


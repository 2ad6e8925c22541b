"""mini-tail (seven domains, each with train / val / test made once, seeded, disjoint) and the project's
own mini CLIP (pretrained offline, deterministic, content-addressed; zero-shot above chance where its
captions named some of the domain's classes; tasks learned on top of it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lada_core import mini_clip as MC
from lada_core.benchmarks import Subset, get_benchmark
from lada_core.benchmarks import mini_tail as MT
from lada_core.benchmarks.render import RenderedImages


def _hashes(src, n: int | None = None) -> set[str]:
    count = len(src) if n is None else min(n, len(src))
    if isinstance(src, RenderedImages):
        return {hashlib.sha256(src.pixels_of(i).tobytes()).hexdigest() for i in range(count)}
    return {hashlib.sha256(np.asarray(src.load(i)).tobytes()).hexdigest() for i in range(count)}


def test_mini_tail_is_seven_domains_with_disjoint_names_and_val() -> None:
    bench = get_benchmark("mini-tail", shots=16)
    assert bench.task_names == list(MT.DOMAINS) == ["textures", "fashion", "digits", "shapes", "greek", "chess", "colours"]
    names = bench.class_names
    assert len(names) == len(set(names)) == 60
    for task in bench.tasks:
        assert task.val is not None and len(task.val) >= 30 * task.num_classes
        assert len(task.test) >= 60 * task.num_classes
        assert np.array_equal(task.class_counts(), np.full(task.num_classes, 16))
        for src in (task.train, task.val, task.test):  # every class in every split
            assert np.array_equal(np.unique(np.asarray(src.labels)), np.arange(task.num_classes))
        # hundreds of optimiser steps per task at batch 64, as on X-TAIL
        steps = task.epochs * -(-len(task.train) // 64)
        assert 200 <= steps <= 300, (task.name, task.epochs, steps)
    assert "val" in bench.spec()["tasks"][0]


def test_splits_are_seeded_and_disjoint() -> None:
    a, b = get_benchmark("mini-tail", shots=16), get_benchmark("mini-tail", shots=16)
    assert a.spec() == b.spec()  # made once: the same on every build
    other = get_benchmark("mini-tail", shots=16, seed=2)
    for ta, to in zip(a.tasks, other.tasks):  # another sampling seed: other shots, same val and test
        assert ta.val.fingerprint() == to.val.fingerprint() and ta.test.fingerprint() == to.test.fingerprint()
        assert ta.train.fingerprint() != to.train.fingerprint()
    full = get_benchmark("mini-tail", shots=None)
    for t16, tfull in zip(a.tasks, full.tasks):  # shots are drawn from the full-shot train pool
        assert isinstance(t16.train, Subset) and t16.train.base.fingerprint() == tfull.train.fingerprint()
    for task in full.tasks:
        n = 40 if isinstance(task.train, RenderedImages) else None  # rendered: a sample is enough
        tr, va, te = _hashes(task.train, n), _hashes(task.val, n), _hashes(task.test, n)
        assert not (tr & va) and not (tr & te) and not (va & te), task.name
    # Fashion-MNIST: train pool and val from the train file, pretraining gets the rest, test from t10k
    raw = MT.load_fashion_mnist()
    sp = MT.fashion_split(raw["train"][1], raw["test"][1])
    parts = [set(sp.train.tolist()), set(sp.val.tolist()), set(sp.pretrain.tolist())]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert len(parts[0] | parts[1] | parts[2]) == 60000 and len(sp.test) == 1000


def test_pretraining_never_sees_mini_tail_images() -> None:
    recipe = MC.with_steps(MC.DEFAULT_RECIPE, 1, fashion_images=3000, rendered_per_class=20, domain_only_per_class=8)
    data = MC.pretrain_data(recipe)
    seen = {hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in data.images}
    bench = get_benchmark("mini-tail", shots=None)
    named = [n for d in recipe.covered for k, n in enumerate(MT.DOMAINS[d]) if k % recipe.named_stride == 0]
    assert sorted(data.class_names[i] for i in set(data.labels.tolist()) if i >= 0) == sorted(named)
    assert "T-shirt/top" in named and "trouser" not in named and "circle" in named and "square" not in named
    assert set(recipe.covered) | set(recipe.domain_only) == set(MT.DOMAINS)
    # every class without its name has an anonymous caption, which is no mini-tail class name
    n_unnamed = sum(len(MT.DOMAINS[d]) for d in MT.DOMAINS) - len(named)
    assert len(data.anonymous_names) == len(set(data.anonymous_names)) == n_unnamed
    assert not set(data.anonymous_names) & set(bench.class_names)
    assert ((data.labels >= 0) != (data.anonymous >= 0)).all()
    targets = data.targets()  # [N, 60 + anonymous]
    assert targets.shape == (len(data.labels), 60 + n_unnamed)
    assert torch.allclose(targets.sum(1), torch.ones(len(targets)))
    unnamed = torch.from_numpy(data.labels < 0)
    w = recipe.anonymous_weight
    # an image of an unnamed class: its anonymous caption, and the class captions of its domain alike
    assert torch.allclose(targets[unnamed, 60:].max(1).values, torch.full((int(unnamed.sum()),), w))
    assert torch.allclose(targets[unnamed, :60].sum(1), torch.full((int(unnamed.sum()),), 1 - w))
    dom = torch.from_numpy(data.domain_of_class)
    for row, d in zip(targets[unnamed, :60], data.domains[data.labels < 0]):
        assert torch.allclose(row[dom == int(d)], row[dom == int(d)][0]) and float(row[dom != int(d)].sum()) == 0.0
    for task in bench.tasks:
        if task.name == "digits":  # scikit-learn's digits: the pretraining draws its own digits
            continue
        for src in (task.train, task.val, task.test):
            if isinstance(src, RenderedImages):
                assert not (seen & _hashes(src, 60)), task.name
            else:  # Fashion-MNIST: compare at the pretraining's 32 px, as it stores them
                from PIL import Image

                mine = {hashlib.sha256(np.asarray(src.load(i).resize((32, 32), Image.Resampling.BICUBIC)).tobytes()).hexdigest() for i in range(len(src))}
                assert not (seen & mine), task.name


TINY_RECIPE = MC.with_steps(MC.DEFAULT_RECIPE, 3, fashion_images=48, rendered_per_class=4, domain_only_per_class=4, batch_size=16,
                           warmup_steps=1)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.integration
def test_pretraining_is_deterministic_and_content_addressed(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a process on more threads than the recipe's: the sidecar says what pretraining ran on
    try:
        a = MC.ensure_weights(recipe=TINY_RECIPE, root=tmp_path / "a", progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    b = MC.ensure_weights(recipe=TINY_RECIPE, root=tmp_path / "b", progress=False, log=lambda m: None)
    assert a.name == b.name == f"lada-mini-{TINY_RECIPE.key()}.pt"
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    meta = json.loads(a.with_suffix(".json").read_text())
    assert meta["key"] == TINY_RECIPE.key() and meta["recipe"]["steps"] == 3 and meta["threads"] == TINY_RECIPE.threads == 1
    # a changed recipe is another file, with other weights
    other = MC.with_steps(TINY_RECIPE, 3, seed=1)
    c = MC.ensure_weights(recipe=other, root=tmp_path / "a", progress=False, log=lambda m: None)
    assert c != a and c.parent == a.parent and not torch.equal(_state(c)["text_projection"], sa["text_projection"])
    # found again: not retrained
    mtime = a.stat().st_mtime_ns
    assert MC.ensure_weights(recipe=TINY_RECIPE, root=tmp_path / "a", progress=False) == a and a.stat().st_mtime_ns == mtime
    assert not list((tmp_path / "a").glob("*.tmp-*"))


def test_pretraining_progress_off_a_terminal_is_a_few_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """Off a terminal (a pipe, a log file) pretraining says how far it is at each quarter, one plain
    line each: no carriage-return bar (a hundred lines in a log; the demo prints under 60)."""
    MC.pretrain(MC.with_steps(TINY_RECIPE, 8), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line.split(" steps")[0] for line in err.splitlines()] == [f"pretraining lada-mini: {k}/8" for k in (2, 4, 6)], err


@pytest.mark.integration
def test_the_shrunk_vocabulary_trains_the_same_weights() -> None:
    """Pretraining trains only the token-embedding rows its captions use: the same bytes as training
    all 49408 rows (the others get no gradient and no weight decay), at less cost."""
    full = MC._shrink_vocabulary
    a = MC.pretrain(TINY_RECIPE, progress=False)
    try:
        MC._shrink_vocabulary = lambda model, tokens: (model.token_embedding, None)  # type: ignore[assignment]
        b = MC.pretrain(TINY_RECIPE, progress=False)
    finally:
        MC._shrink_vocabulary = full  # type: ignore[assignment]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["token_embedding.weight"].shape[0] == 49408


@pytest.mark.integration
def test_a_truncated_weights_file_is_never_used(tmp_path: Path) -> None:
    path = MC.ensure_weights(recipe=TINY_RECIPE, root=tmp_path, progress=False, log=lambda m: None)
    good = _state(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert MC.verified(path) is None
    said: list[str] = []
    again = MC.ensure_weights(recipe=TINY_RECIPE, root=tmp_path, progress=False, log=said.append)
    assert again == path and MC.verified(path) is not None and any("truncated" in m for m in said)
    assert all(torch.equal(good[k], v) for k, v in _state(path).items())
    path.with_suffix(".json").unlink()  # no sidecar: not trusted either
    assert MC.verified(path) is None


def test_offline_tag_is_for_the_packaged_mini_model_only() -> None:
    from lada_core.backbone import BackboneError, check_model, check_weights_available

    check_model("lada-mini", "lada-offline")
    check_weights_available("lada-mini", "lada-offline")  # built on first use: nothing to fetch
    with pytest.raises(BackboneError, match="lada-offline.*lada-mini only"):
        check_model("lada-tiny", "lada-offline")


@pytest.mark.integration
def test_mini_clip_zero_shot_above_chance_where_pretrained(mini_clip) -> None:
    """The X-TAIL rule before the first task (all 60 class names): clearly above chance on the domains
    whose classes the captions partly named, near within-domain chance on the others, and far from
    solved anywhere."""
    bench = get_benchmark("mini-tail", shots=16)
    zs = MC.zero_shot(mini_clip, bench)
    print("\nzero-shot per task:", {k: round(v, 1) for k, v in zs.items()})
    chance = 100.0 / len(bench.class_names)
    covered = [zs[d] for d in MC.COVERED]
    assert min(covered) > 10 * chance and max(covered) < 60.0, zs  # above chance, not trivially solved
    for task in bench.tasks:
        if task.name not in MC.COVERED:
            assert zs[task.name] < 100.0 / task.num_classes + 10.0, (task.name, zs)  # near within-domain chance
    assert np.mean([v for k, v in zs.items() if k not in MC.COVERED]) < min(covered), zs


@pytest.mark.integration
def test_a_task_is_learned_on_the_mini_clip(mini_clip_cache, mini_clip, tmp_path: Path) -> None:
    """Two tasks with the benchmark's schedule and the paper's settings (scored over their 18 class
    names): the first, near chance at zero-shot, is learned; so is the second, whose classes the
    captions partly named."""
    from lada_core.trainer import run_continual

    cfg, bundle = mini_clip_cache
    two = type(bundle)(bundle.key, bundle.path, bundle.tasks[:2], bundle.template, bundle.embed_dim)
    result = run_continual(cfg, two, tmp_path / "run", backbone=mini_clip, log=lambda m: None)
    zs = MC.zero_shot(mini_clip, get_benchmark("mini-tail", shots=16))
    print("\n", result.matrix, zs)
    assert result.matrix[0, 0] > zs["textures"] + 20.0
    assert result.matrix[1, 1] > zs["fashion"] + 10.0

"""Faithful to the authors' code on real CLIP weights (method page, sections 2, 3, 5, 7): the QuickGELU
activation of OpenAI's weights, the authors' seeds and few-shot draw, and checkpoints that load no code.
No download: models are random-init or tiny fake checkpoints written here."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY

from lada_core import backbone as B
from lada_core.benchmarks.base import few_shot_indices
from lada_core.config import Config, build_config


def _activations(model: torch.nn.Module) -> dict[str, set[str]]:
    """The activation class of every residual MLP, per tower (``visual`` / text)."""
    out: dict[str, set[str]] = {"visual": set(), "text": set()}
    for name, mod in model.named_modules():
        if name.endswith("mlp.gelu"):
            out["visual" if name.startswith("visual.") else "text"].add(type(mod).__name__)
    return out


def test_default_backbone_is_quick_gelu_in_every_block() -> None:
    """The default config's model (OpenAI's ViT-B/16), built with random init: QuickGELU in every
    residual MLP of both towers (open_clip's plain ViT-B-16 config builds nn.GELU)."""
    cfg = Config()
    assert cfg.backbone.pretrained == "openai"
    bb = B.load_backbone(cfg.backbone.model, None)
    acts = _activations(bb.model)
    assert acts == {"visual": {"QuickGELU"}, "text": {"QuickGELU"}}
    n_blocks = sum(1 for n, _ in bb.model.named_modules() if n.endswith("mlp.gelu"))
    assert n_blocks == 24  # 12 image + 12 text blocks


def test_openai_tag_in_a_gelu_architecture_is_corrected() -> None:
    """``ViT-B-16`` + ``openai``: open_clip alone would build GELU and warn; here the activation follows
    the weights, and both spellings share one weights identity (one feature cache)."""
    assert B.weights_quick_gelu("ViT-B-16", "openai") is True
    assert B.quick_gelu_plan("ViT-B-16", "openai") is True
    assert B.quick_gelu_plan("ViT-B-16-quickgelu", "openai") is False  # already QuickGELU
    assert B.quick_gelu_plan("ViT-B-16", "laion2b_s34b_b88k") is False  # trained with GELU
    assert B.identity("ViT-B-16", "openai") == B.identity("ViT-B-16-quickgelu", "openai")
    assert B.identity("ViT-B-16", "openai") != B.identity("ViT-B-16", "laion2b_s34b_b88k")


@pytest.fixture(scope="module")
def fake_openai_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A TorchScript archive of the tiny model, the way OpenAI's ``clip`` package ships ``ViT-B-16.pt``."""
    import open_clip

    B._register_packaged()
    torch.manual_seed(3)
    model = open_clip.create_model(TINY, pretrained=None)
    model.eval()
    size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size)
    traced = torch.jit.trace(
        model, (torch.zeros(1, 3, size, size), torch.zeros(1, model.context_length, dtype=torch.long)),
        strict=False, check_trace=False,
    )
    path = tmp_path_factory.mktemp("weights") / "ViT-tiny.pt"
    torch.jit.save(traced, str(path))
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def test_openai_checkpoint_file_gets_quick_gelu(fake_openai_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """A local checkpoint path of OpenAI weights (a TorchScript archive) ends up with QuickGELU in an
    architecture whose config says GELU, with the file's weights (open_clip 3.3 alone refuses the file)."""
    path, weights = fake_openai_checkpoint
    assert B.is_torchscript_archive(path)
    bb = B.load_backbone(TINY, str(path))
    assert _activations(bb.model) == {"visual": {"QuickGELU"}, "text": {"QuickGELU"}}
    loaded = bb.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    assert B.identity(TINY, str(path)) != B.identity(TINY, None)


def test_state_dict_file_keeps_the_architecture_activation(tmp_path: Path) -> None:
    """A plain state dict cannot say how it was trained: the architecture's own activation is kept
    (the ``-quickgelu`` model names are the switch for OpenAI state dicts)."""
    import open_clip

    B._register_packaged()
    path = tmp_path / "tiny_state.pt"
    torch.save(open_clip.create_model(TINY, pretrained=None).state_dict(), path)
    assert not B.is_torchscript_archive(path) and B.weights_quick_gelu(TINY, str(path)) is None
    assert _activations(B.load_backbone(TINY, str(path)).model) == {"visual": {"GELU"}, "text": {"GELU"}}


@pytest.mark.e2e
def test_dry_run_of_the_default_model_reports_the_trainable_counts() -> None:
    """open_clip's ViT-B-16 architecture (QuickGELU), random init (no download), on mini-tail:
    12 x (1024 + 8208 + 8704 + 1) for the text adapters plus classes x lambda1 x 512 for the units."""
    out = subprocess.run(
        [sys.executable, "-m", "lada_core.cli", "--dry-run", "--set", "backbone.pretrained=null", "--set", "data.shots=null"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    import json

    plan = json.loads(out.stdout)
    assert plan["backbone"] == "ViT-B-16-quickgelu"
    assert plan["num_tasks"] == 7 and plan["num_classes"] == 60
    for task in plan["tasks"]:
        assert task["trainable_params"] == 12 * (1024 + 8208 + 8704 + 1) + task["classes"] * 16 * 512
    assert [t["name"] for t in plan["tasks"]][:2] == ["textures", "fashion"]
    assert plan["tasks"][1]["class_names"][:2] == ["T-shirt/top", "trouser"]


# ------------------------------------------------------------------------------------ seeds, sampling


def test_cluster_seed_defaults_to_the_authors_42() -> None:
    cfg = build_config(overrides=["train.seed=5"])
    assert cfg.lada.cluster_seed == 42 and cfg.train.seed == 5


@pytest.mark.integration
def test_kmeans_and_mixtures_use_the_cluster_seed(tmp_path: Path, mini_cache, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """The trainer passes ``lada.cluster_seed`` (42), not ``train.seed``, to k-means and the mixtures."""
    from dataclasses import replace

    from lada_core import trainer

    seeds: dict[str, set[int]] = {"kmeans": set(), "gmm": set()}
    real_k, real_g = trainer.kmeans_units, trainer.fit_gaussians

    def kmeans(*a, **k):  # noqa: ANN002, ANN003, ANN202
        seeds["kmeans"].add(a[-1])
        return real_k(*a, **k)

    def gmm(*a, **k):  # noqa: ANN002, ANN003, ANN202
        seeds["gmm"].add(a[-1])
        return real_g(*a, **k)

    monkeypatch.setattr(trainer, "kmeans_units", kmeans)
    monkeypatch.setattr(trainer, "fit_gaussians", gmm)
    cfg, _info, bundle = mini_cache
    cfg = replace(cfg, optim=replace(cfg.optim, epochs=1), train=replace(cfg.train, seed=5))
    trainer.run_continual(cfg, bundle, tmp_path / "run", log=lambda m: None)
    assert seeds == {"kmeans": {42}, "gmm": {42}}


def test_authors_few_shot_rule() -> None:
    """CoOp's rule after ``random.seed(0)``: classes in the order of their first image, per class
    ``random.sample`` (or ``random.choices`` when short), drawn in that order from one generator."""
    labels = np.array([2, 0, 2, 1, 0, 2, 0, 2, 1, 0])
    got = few_shot_indices(labels, 3, seed=123, num_classes=3, rule="authors")
    random.seed(0)
    by_class = {2: [0, 2, 5, 7], 0: [1, 4, 6, 9], 1: [3, 8]}
    expected = random.sample(by_class[2], 3) + random.sample(by_class[0], 3) + random.choices(by_class[1], k=3)
    assert got.tolist() == expected
    # the seed of the "seeded" rule does not enter: the authors' seed is 0 in every task
    assert few_shot_indices(labels, 3, seed=7, num_classes=3, rule="authors").tolist() == expected
    assert few_shot_indices(labels, 3, seed=7, num_classes=3, rule="seeded").tolist() != expected


def test_authors_rule_is_the_default_for_xtail(tmp_path: Path) -> None:
    from xtail_fixture import make_xtail_tree

    from lada_core.benchmarks import get_benchmark

    root = make_xtail_tree(tmp_path, 3, 5, 1)
    b = get_benchmark("xtail", data_root=str(root), shots=2)
    task = b.tasks[0]
    idx = task.train.indices  # type: ignore[attr-defined]
    base_labels = np.asarray(task.train.base.labels)  # type: ignore[attr-defined]
    assert idx.tolist() == few_shot_indices(base_labels, 2, 1, task.num_classes, "authors").tolist()
    assert build_config().data.sample_rule == "authors"


# ------------------------------------------------------------------------------------------- checkpoints


class _Boom:
    def __reduce__(self):  # noqa: ANN204 - the classic code-running pickle
        return (Path.touch, (Path(_Boom.target),))

    target = ""


def test_crafted_checkpoint_is_refused_without_running_code(tmp_path: Path) -> None:
    from lada_core.trainer import STATE_FILE, CheckpointError, load_checkpoint

    folder = tmp_path / "task-000"
    folder.mkdir()
    marker = tmp_path / "pwned"
    _Boom.target = str(marker)
    torch.save({"task_index": 0, "payload": _Boom()}, folder / STATE_FILE)
    with pytest.raises(CheckpointError, match=r"refused checkpoint .*task-000/state.pt") as err:
        load_checkpoint(folder)
    assert "\n" not in str(err.value)
    assert not marker.exists()  # the pickle's code never ran
    # a file of plain types with other keys is refused too
    torch.save({"task_index": 0}, folder / STATE_FILE)
    with pytest.raises(CheckpointError, match="keys differ"):
        load_checkpoint(folder)
    (folder / STATE_FILE).write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CheckpointError, match="state.pt"):
        load_checkpoint(folder)


@pytest.mark.integration
def test_trainer_checkpoints_load_with_weights_only(tmp_path: Path, mini_cache) -> None:  # noqa: ANN001
    """What run_continual writes loads with ``weights_only=True``; the rows are a tensor."""
    from dataclasses import replace

    from lada_core.trainer import STATE_FILE, load_checkpoint, run_continual

    cfg, _info, bundle = mini_cache
    cfg = replace(cfg, optim=replace(cfg.optim, epochs=1))
    res = run_continual(cfg, bundle, tmp_path / "run", log=lambda m: None)
    state = torch.load(tmp_path / "run" / "task-000" / STATE_FILE, weights_only=True)
    assert isinstance(state["rows"], torch.Tensor) and state["rows"].shape == (1, len(res.task_names))
    last = load_checkpoint(tmp_path / "run" / f"task-{len(res.task_names) - 1:03d}")
    np.testing.assert_allclose(last["rows"].numpy(), res.matrix)


# ------------------------------------------------------------------------------------------- class names


@pytest.mark.e2e
def test_dry_run_on_xtail_prints_the_authors_class_names(tmp_path: Path) -> None:
    """``lada-train --dry-run --benchmark xtail`` shows the prompts' names: MNIST as
    'number: "0 - zero"', EuroSAT with ' satellite location' appended."""
    import json

    from xtail_fixture import make_xtail_tree

    root = make_xtail_tree(tmp_path, 2, 2, 1)
    out = subprocess.run(
        [sys.executable, "-m", "lada_core.cli", "--dry-run", "--benchmark", "xtail", "--data-root", str(root),
         "--set", f"backbone.model={TINY}", "--set", "backbone.pretrained=null"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    names = {t["name"]: t["class_names"] for t in json.loads(out.stdout)["tasks"]}
    assert names["MNIST"][0] == 'number: "0 - zero"' and names["MNIST"][9] == 'number: "9 - nine"'
    assert names["EuroSAT"][0] == "Annual Crop Land satellite location"
    assert all(n.endswith(" satellite location") for n in names["EuroSAT"])

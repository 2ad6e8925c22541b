"""GPU paths (marker ``gpu``; they need CUDA and are skipped without it): mixed-precision extraction,
the CUDA-graph text encoder, and divergence detection without per-step syncs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from lada_core import trainer as T
from lada_core.config import build_config
from lada_core.features import ensure_cache, load_bundle

pytestmark = [pytest.mark.gpu, pytest.mark.integration, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def gpu_setup(tmp_path_factory: pytest.TempPathFactory, tiny_backbone):
    root = tmp_path_factory.mktemp("gpu")
    cpu_cfg = build_config(overrides=tiny_overrides(root / "cpu", views=2, epochs=4))
    gpu_cfg = build_config(overrides=["data.device=cuda", "train.device=cuda", f"data.cache_root={root / 'gpu'}"], base=cpu_cfg)
    cpu = load_bundle(ensure_cache(cpu_cfg, progress=False, backbone=tiny_backbone, log=lambda m: None).path)
    gpu = load_bundle(ensure_cache(gpu_cfg, progress=False, backbone=tiny_backbone, log=lambda m: None).path)
    return root, gpu_cfg, cpu, gpu


def test_fp16_extraction_matches_cpu(gpu_setup) -> None:
    _, _, cpu, gpu = gpu_setup
    for a, b in zip(cpu.tasks, gpu.tasks):
        x, y = np.asarray(a.test, np.float32), np.asarray(b.test, np.float32)
        cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        assert cos.min() > 0.999


def test_cuda_graph_text_encoder_equals_eager(gpu_setup, tiny_backbone, monkeypatch) -> None:
    root, cfg, _, gpu = gpu_setup
    graphed = T.run_continual(cfg, gpu, root / "graphed", backbone=tiny_backbone, log=lambda m: None)
    monkeypatch.setattr(T, "CUDA_GRAPHS", False)
    eager = T.run_continual(cfg, gpu, root / "eager", backbone=tiny_backbone, log=lambda m: None)
    np.testing.assert_array_equal(graphed.matrix, eager.matrix)


def test_divergence_detected_on_gpu(gpu_setup, tiny_backbone) -> None:
    root, cfg, _, gpu = gpu_setup
    bad = build_config(overrides=["optim.lr=1e30"], base=cfg)
    with pytest.raises(T.DivergenceError, match="task 1/7"):
        T.run_continual(bad, gpu, root / "nan", backbone=tiny_backbone, log=lambda m: None)


def test_gpu_run_resumes_to_the_same_matrix(gpu_setup, tiny_backbone) -> None:
    root, cfg, _, gpu = gpu_setup
    full = T.run_continual(cfg, gpu, root / "full", backbone=tiny_backbone, log=lambda m: None)
    stop = root / "stop"

    class Stop(Exception):
        pass

    def halt(ev: T.TaskEnd) -> None:
        if ev.task_index == 2 and not ev.resumed:
            raise Stop

    with pytest.raises(Stop):
        T.run_continual(cfg, gpu, stop, on_task_end=halt, backbone=tiny_backbone, log=lambda m: None)
    again = T.run_continual(cfg, gpu, stop, backbone=tiny_backbone, log=lambda m: None)
    np.testing.assert_array_equal(full.matrix, again.matrix)
    assert Path(stop / "task-006").is_dir()

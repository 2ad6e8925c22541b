"""``ray_cluster.yaml`` is a real launcher config: Ray's own preparation and schema validation accept
it (offline: no cloud call), and it has what the product needs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

pytestmark = pytest.mark.unit

CONFIG = Path(__file__).resolve().parent.parent / "ray_cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_passes_rays_validation() -> None:
    prepared = prepare_config(copy.deepcopy(load()))
    validate_config(prepared)
    assert prepared["provider"]["type"] in ("aws", "gcp")


def test_head_and_autoscaling_gpu_workers() -> None:
    cfg = load()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = {k: v for k, v in types.items() if v.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types, "a GPU worker type"
    for spec in gpu_types.values():
        assert spec["min_workers"] < spec["max_workers"], "autoscaling"
        assert all(isinstance(v, int) for v in spec["resources"].values()), "node resources are integers"


def test_setup_installs_the_project_with_the_local_ray_version() -> None:
    cfg = load()
    text = "\n".join(cfg["setup_commands"])
    assert f"ray[default,tune]=={ray.__version__}" in text
    assert "pip install" in text and ".[sweep]" in text
    assert any(v == "." for v in cfg["file_mounts"].values()), "the project is shipped to the nodes"
    assert ray.__version__ in cfg["docker"]["image"]


def test_shared_storage_and_loopback_mlflow() -> None:
    cfg = load()
    init = "\n".join(cfg["initialization_commands"])
    assert "/mnt/shared" in init and "mount" in init
    head = "\n".join(cfg["head_start_ray_commands"])
    assert "mlflow server --host 127.0.0.1" in head
    assert "--dashboard-host=127.0.0.1" in head
    assert "/mnt/shared" in head
    header = CONFIG.read_text().split("cluster_name")[0]
    assert "ray attach ray_cluster.yaml -p 5000" in header and "ssh" in header and "-L 5000:127.0.0.1:5000" in header


def test_resource_check_reads_the_node_types(tmp_path: Path) -> None:
    """The driver's resource check knows what the autoscaler can add (it reads the bootstrap config)."""
    from sweeps.resources import autoscaler_node_types, check_request

    boot = tmp_path / "ray_bootstrap_config.yaml"
    boot.write_text(CONFIG.read_text())
    types = autoscaler_node_types(boot)
    assert types["gpu_worker_4x"]["GPU"] == 4 and "head" not in types
    head_only = [{"Alive": True, "Resources": {"CPU": 0.0}}]
    check_request({"CPU": 1, "GPU": 0.25}, head_only, types)
    check_request({"CPU": 8, "GPU": 4}, head_only, types)

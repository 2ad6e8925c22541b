"""Check a trial's resource request against the cluster before a sweep starts.

Ray leaves a trial that no node can hold PENDING forever, with warnings only. A sweep must instead
fail at once with a message that says what was asked and what the nodes have. A request fits when one
alive node (a trial's bundle is placed on one node) has the CPUs and GPUs, or when the autoscaler can
launch a node type that has them (the launcher writes its config to ``~/ray_bootstrap_config.yaml`` on
the head node; the driver runs there).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


class ResourceError(ValueError):
    """A resource request that no node of the cluster can satisfy (one-line message)."""


def validate_request(cpus: float, gpus: float) -> None:
    """The shape of a per-trial request: CPUs > 0; GPUs >= 0, fractional only below 1."""
    if not (cpus > 0 and math.isfinite(cpus)):
        raise ResourceError(f"--cpus-per-trial must be > 0, got {cpus:g}")
    if not (gpus >= 0 and math.isfinite(gpus)):
        raise ResourceError(f"--gpus-per-trial must be >= 0, got {gpus:g}")
    if gpus > 1 and not float(gpus).is_integer():
        raise ResourceError(
            f"--gpus-per-trial {gpus:g}: above 1 it must be a whole number (a data-parallel trial uses whole GPUs); "
            "fractions below 1 pack several trials on one GPU"
        )


def _fmt(res: Mapping[str, float]) -> str:
    return f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"


def fits(request: Mapping[str, float], available: Mapping[str, float]) -> bool:
    return all(available.get(k, 0.0) + 1e-9 >= v for k, v in request.items() if v > 0)


def autoscaler_node_types(path: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Node types the autoscaler may launch (``max_workers > 0``), from the launcher's bootstrap config."""
    p = Path(path or BOOTSTRAP_CONFIG).expanduser()
    if not p.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(p.read_text()) or {}
    except Exception:
        return {}
    out: dict[str, dict[str, float]] = {}
    for name, spec in (data.get("available_node_types") or {}).items():
        if not isinstance(spec, dict) or int(spec.get("max_workers", 0) or 0) <= 0:
            continue
        out[name] = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
    return out


def check_request(
    request: Mapping[str, float],
    nodes: Iterable[Mapping[str, Any]],
    node_types: Mapping[str, Mapping[str, float]] | None = None,
) -> None:
    """Raise :class:`ResourceError` unless one alive node or one launchable node type fits ``request``
    (keys ``CPU``/``GPU`` as in ``ray.nodes()``)."""
    alive = [n for n in nodes if n.get("Alive", n.get("alive", True))]
    for n in alive:
        if fits(request, n.get("Resources", {})):
            return
    for spec in (node_types or {}).values():
        if fits(request, spec):
            return
    have = sorted((_fmt(n.get("Resources", {})) for n in alive), reverse=True)
    types = "; node types the autoscaler can add: " + ", ".join(f"{k} ({_fmt(v)})" for k, v in node_types.items()) if node_types else ""
    raise ResourceError(
        f"no node can run a trial that needs {_fmt(request)} (a trial runs on one node); "
        f"nodes: {', '.join(have) or 'none'}{types}. Lower --cpus-per-trial/--gpus-per-trial or add such a node"
    )


def check_cluster(cpus: float, gpus: float, bootstrap_config: str | Path | None = None) -> dict[str, float]:
    """Validate against the connected Ray cluster; returns ``ray.cluster_resources()``."""
    import ray

    validate_request(cpus, gpus)
    check_request({"CPU": cpus, "GPU": gpus}, ray.nodes(), autoscaler_node_types(bootstrap_config))
    return dict(ray.cluster_resources())

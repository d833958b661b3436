"""Every `ray up` cluster YAML in deploy/ passes Ray's own cluster-config preparation and
schema validation (what `ray up` runs before it launches anything), and the node types of
the GPU and CPU ones offer the resources `--prefill-resource` / `--decode-resource` name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CONFIGS = sorted(DEPLOY.glob("ray-cluster*.yaml"))


def load(path: Path) -> dict[str, Any]:
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict)
    return raw


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_ray_validates_the_cluster_config(path: Path) -> None:
    validate_config(prepare_config(load(path)))


@pytest.mark.parametrize("name", ["ray-cluster-gpu.yaml", "ray-cluster-cpu.yaml"])
def test_node_types_offer_the_pool_resources(name: str) -> None:
    types = load(DEPLOY / name)["available_node_types"]
    offered = {k for t in types.values() for k in t.get("resources", {})}
    assert {"pdserve_prefill", "pdserve_decode"} <= offered
    if name.endswith("gpu.yaml"):
        for t in types.values():
            res = t["resources"]
            pools = res.get("pdserve_prefill", 0) + res.get("pdserve_decode", 0)
            assert pools == res.get("GPU", 0), t  # one unit per GPU


def test_a_broken_config_is_refused() -> None:
    bad = load(DEPLOY / "ray-cluster-gpu.yaml")
    bad["available_node_types"]["decode_gpu"]["min_workers"] = "one"
    with pytest.raises(Exception, match="one"):
        validate_config(prepare_config(bad))

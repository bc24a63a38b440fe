"""cluster.yaml is a valid Ray cluster config (checked with Ray's own schema and defaults)."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_is_valid_for_ray_up():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    workers = prepared["available_node_types"]["gpu-worker"]
    assert workers["max_workers"] <= prepared["max_workers"]
    assert any("pip install" in c for c in prepared["setup_commands"])

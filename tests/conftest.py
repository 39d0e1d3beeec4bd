"""Shared fixtures: the tiny config, the tokenizer, a local Ray instance, free ports.

Tests that start Ray, MLflow servers or a browser carry the ``integration`` marker (they run in CI like
every other test; ``pytest -m "not integration"`` is the quick loop while editing)."""

import os
import socket

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from trainables.config import ModelConfig
    from trainables.models import load_tokenizer

    return load_tokenizer(ModelConfig(name="tiny"))


TINY_OVERRIDES = [
    "data.split=release", "data.to_learn_size=8", "data.ntf_size=8", "data.max_doc_tokens=64",
    "train.epochs=2", "train.batch_size=4", "train.lr=1e-3", "train.max_length=64",
    "params.kind=lora", "params.r=4", "params.dropout=0.1", "eval.batch_size=16",
]


@pytest.fixture
def tiny_cfg():
    from trainables.config import load_config

    def make(*extra):
        return load_config(None, TINY_OVERRIDES + list(extra))

    return make


def free_port_number() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    return free_port_number


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance with 2 CPUs on 127.0.0.1 for the module's tests (the one `taalm` starts)."""
    import ray

    from orchestrator.study import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()

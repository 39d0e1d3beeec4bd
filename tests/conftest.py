"""Shared fixtures: the tiny config, the tokenizer, a local Ray instance, free ports.

Tests that start Ray, MLflow servers or a browser carry the ``integration`` marker (they run in CI like
every other test; ``pytest -m "not integration"`` is the quick loop while editing).

The tests that run studies share one local Ray instance for the whole session (``ray_head``: what
``taalm ray start`` starts, 2 CPUs, 127.0.0.1 only), started when the first of them needs it: each attaches to
it (``ray_local``, or a ``taalm ablate`` subprocess without ``--num-cpus``) instead of starting Ray itself. The
tests that need a Ray of their own (the two-node cluster, the SIGKILLed driver, the loopback check of a new
instance) start one as before. The session records its instance in a file of its own (``TAALM_RAY_HEAD``), so no
test attaches to a ``taalm ray start`` instance of the developer's."""

import os
import socket
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["TAALM_RAY_HEAD"] = str(Path(tempfile.mkdtemp(prefix="taalm-tests-ray-")) / "head.json")


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


@pytest.fixture(scope="session")
def ray_head():
    """The session's local Ray instance (`taalm ray start --num-cpus 2`: 127.0.0.1 only, token authentication),
    started when a test first needs it and stopped at the end of the session; its record."""
    from orchestrator.local_ray import start_head, stop_head

    rec, _ = start_head(num_cpus=2)
    try:
        yield rec
    finally:
        stopped = stop_head()
        if stopped and stopped.get("killed"):  # in the output of the session: what did not stop on SIGTERM
            print(f"\nthe session's local Ray instance: killed after 5 s: {', '.join(stopped['killed'])}")


@pytest.fixture
def ray_local(ray_head):
    """This process attached to the session's local Ray instance for one test (what `taalm ablate` does while
    `taalm ray start` runs), detached afterwards; the instance keeps running for the next test."""
    import ray

    from orchestrator.local_ray import init_ray

    how = init_ray(None)
    assert how.startswith("attached to the local Ray instance"), how
    yield ray_head
    ray.shutdown()

import os

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

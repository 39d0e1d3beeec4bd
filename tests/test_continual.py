"""The continual loop on `tiny`: determinism, checkpoint/resume, callbacks, metrics.json."""

import json

import pytest
import torch
from safetensors.torch import load_file

from trainables.continual import continual_update
from trainables.errors import InputError
from trainables.loop import Callback


class Recorder(Callback):
    def __init__(self, crash_after=None):
        self.reports, self.crash_after = [], crash_after

    def on_report(self, r):
        self.reports.append(r)
        if self.crash_after is not None and r.index == self.crash_after:
            raise KeyboardInterrupt("simulated crash")


def _curves(m):
    return {k: m[k] for k in ("to_learn_acc", "ntf_acc", "to_learn_em", "ntf_em", "train_loss", "mean_weight")}


def test_metrics_file_and_callbacks(tiny_cfg, tmp_path):
    rec = Recorder()
    m = continual_update(tiny_cfg(), out_dir=tmp_path, callbacks=[rec])
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("to_learn_acc", "ntf_acc", "to_learn_em", "ntf_em", "top_acc", "top_epoch", "nf_acc",
                "total_knowledge", "wall_seconds", "config"):
        assert key in on_disk, key
    assert len(on_disk["to_learn_acc"]) == 3 and len(on_disk["ntf_acc"]) == 3  # epochs 0, 1, 2
    assert [r.index for r in rec.reports] == [0, 1, 2] and {r.kind for r in rec.reports} == {"epoch"}
    assert on_disk["train_loss"][0] is None and on_disk["train_loss"][1] > 0
    assert on_disk["config"]["train"]["epochs"] == 2
    assert m["n_to_learn"] == 8 and m["n_ntf"] == 8
    # the loss goes down on the training documents
    assert on_disk["train_loss"][2] < on_disk["train_loss"][1]


def test_same_seed_same_metrics(tiny_cfg, tmp_path):
    a = continual_update(tiny_cfg("weighting.scheme=random"), out_dir=tmp_path / "a")
    b = continual_update(tiny_cfg("weighting.scheme=random"), out_dir=tmp_path / "b")
    c = continual_update(tiny_cfg("weighting.scheme=random", "seed=1"), out_dir=tmp_path / "c")
    assert _curves(a) == _curves(b)
    assert a["train_loss"] != c["train_loss"]
    pa = load_file(str(tmp_path / "a" / "checkpoint" / "trainable.safetensors"))
    pb = load_file(str(tmp_path / "b" / "checkpoint" / "trainable.safetensors"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_resume_after_crash_matches_uninterrupted(tiny_cfg, tmp_path):
    # dropout and random weights both draw from RNGs: the resumed run must restore them
    overrides = ("train.epochs=3", "weighting.scheme=random", "params.dropout=0.2")
    full = continual_update(tiny_cfg(*overrides), out_dir=tmp_path / "full")
    crash = Recorder(crash_after=1)
    with pytest.raises(KeyboardInterrupt):
        continual_update(tiny_cfg(*overrides), out_dir=tmp_path / "resumed", callbacks=[crash])
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1
    rec = Recorder()
    resumed = continual_update(tiny_cfg(*overrides), out_dir=tmp_path / "resumed", callbacks=[rec])
    assert [r.index for r in rec.reports] == [2, 3]  # epochs 0 and 1 were not redone
    assert _curves(resumed) == _curves(full)
    pf = load_file(str(tmp_path / "full" / "checkpoint" / "trainable.safetensors"))
    pr = load_file(str(tmp_path / "resumed" / "checkpoint" / "trainable.safetensors"))
    assert all(torch.equal(pf[k], pr[k]) for k in pf)


def test_resume_with_a_different_config_is_refused(tiny_cfg, tmp_path):
    continual_update(tiny_cfg("train.epochs=1"), out_dir=tmp_path)
    with pytest.raises(InputError, match="different configuration"):
        continual_update(tiny_cfg("train.epochs=1", "train.lr=0.5"), out_dir=tmp_path)


def test_corrupt_checkpoint_is_an_input_error(tiny_cfg, tmp_path):
    continual_update(tiny_cfg("train.epochs=1"), out_dir=tmp_path)
    (tmp_path / "checkpoint" / "trainable.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(InputError, match="corrupt checkpoint"):
        continual_update(tiny_cfg("train.epochs=2"), out_dir=tmp_path)


def test_full_finetuning_and_schemes_run(tiny_cfg, tmp_path):
    for scheme in ("oracle", "known_mask", "rho1", "oracle*known_mask"):
        for kind in ("lora", "full"):
            m = continual_update(tiny_cfg("train.epochs=1", f"weighting.scheme={scheme}", f"params.kind={kind}"))
            assert len(m["to_learn_acc"]) == 2
            assert 0.0 <= m["mean_weight"][1] <= 1.0
    # the oracle trains on a small fraction of the tokens, uniform on all of them
    m = continual_update(tiny_cfg("train.epochs=1", "weighting.scheme=oracle"))
    assert 0 < m["mean_weight"][1] < 0.5


def test_memorisation_raises_to_learn_accuracy(tiny_cfg):
    """A full fine-tune of the tiny model on 4 short documents learns (part of) their objects."""
    cfg = tiny_cfg("data.to_learn_size=4", "train.epochs=25", "params.kind=full", "train.lr=3e-3",
                   "weighting.scheme=oracle", "data.max_doc_tokens=40", "train.batch_size=4")
    m = continual_update(cfg)
    assert m["to_learn_acc"][0] == 0.0
    assert m["top_acc"] > 0.0


def test_trials_of_a_study_starting_from_the_same_theta_evaluate_epoch_0_once(tiny_cfg, tmp_path, monkeypatch):
    """With a study's cache directory, a run whose θ at epoch 0 another run already evaluated (same model,
    adapter, seed and training set-up; only the token weighting differs) reads that evaluation: the same
    numbers as computing it, one evaluation fewer. Another seed evaluates its own θ."""
    from trainables import continual

    calls = []
    real = continual.evaluate
    monkeypatch.setattr(continual, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    alone = continual_update(tiny_cfg("train.epochs=1"))  # no cache: epochs 0 and 1 evaluated
    assert len(calls) == 2
    cache = tmp_path / "initial_eval"
    first = continual_update(tiny_cfg("train.epochs=1"), initial_eval_cache=cache)
    second = continual_update(tiny_cfg("train.epochs=1", "weighting.scheme=oracle"), initial_eval_cache=cache)
    assert len(calls) == 2 + 2 + 1  # the second run evaluated epoch 1 only
    for m in (first, second):
        for k in ("to_learn_acc", "ntf_acc", "to_learn_em", "ntf_em", "to_learn_per_fact", "ntf_per_fact"):
            assert m[k][0] == alone[k][0], k
    assert first["train_loss"] == alone["train_loss"]  # reading epoch 0 changes nothing after it
    other_seed = continual_update(tiny_cfg("train.epochs=1", "seed=1"), initial_eval_cache=cache)
    assert len(calls) == 5 + 2 and len(list(cache.glob("*.json"))) == 2
    assert other_seed["to_learn_acc"][0] == continual_update(tiny_cfg("train.epochs=1", "seed=1"))["to_learn_acc"][0]

"""The training step's execution options (trainables/step.py) on `tiny`: batches grouped by length, micro-batches
(gradient accumulation: the same update), a CUDA out-of-memory inside a step (simulated: this machine has no GPU)
either failing with the size or halving the micro-batch, bf16 autocast within a stated bound of fp32, PyTorch's
fused attention, and the evaluation judging only the object positions on the model's device."""

import math
import random

import pytest
import torch

from trainables.continual import continual_update, prepare_run
from trainables.step import StepOutOfMemoryError, epoch_batches


def _padding(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouped_batches_hold_every_document_once_with_less_padding():
    rng = random.Random(0)
    lengths = [rng.randint(10, 256) for _ in range(300)]
    plain = epoch_batches(300, 8, 123)
    grouped = epoch_batches(300, 8, 123, lengths)
    assert sorted(sum(grouped, [])) == list(range(300)) and len(grouped) == len(plain) == math.ceil(300 / 8)
    assert _padding(grouped, lengths) < 0.2 * _padding(plain, lengths)  # padding tokens cut by more than 5x here
    assert grouped == epoch_batches(300, 8, 123, lengths)  # seeded
    assert grouped != epoch_batches(300, 8, 124, lengths)
    assert [len(b) for b in plain] == [len(b) for b in epoch_batches(300, 8, 123)]  # no lengths: as before


def test_grouping_is_off_with_replay_and_says_so(tiny_cfg):
    grouped = continual_update(tiny_cfg("train.epochs=1", "train.group_by_length=true"))
    assert grouped["group_by_length"] == "on"
    with_replay = continual_update(tiny_cfg("train.epochs=1", "train.group_by_length=true", "replay.kind=mix_review",
                                            "replay.size=8"))
    assert with_replay["group_by_length"].startswith("off: replayed documents")


def _run(tiny_cfg, *extra, hook=None):
    cfg = tiny_cfg("params.dropout=0.0", *extra)
    setup = prepare_run(cfg)
    if hook is not None:
        setup.model.register_forward_pre_hook(hook, with_kwargs=True)
    m = continual_update(cfg, setup=setup)
    return m, {k: v.detach().clone() for k, v in setup.trainable.items()}


def test_micro_batches_make_the_same_update(tiny_cfg):
    """A batch of 4 as 2 micro-batches of 2 (gradient accumulation): the same mean loss over the batch's sequences,
    so the same update up to float summation order."""
    whole, pw = _run(tiny_cfg)
    micro, pm = _run(tiny_cfg, "train.micro_batch_size=2")
    assert micro["train_loss"][1:] == pytest.approx(whole["train_loss"][1:], rel=1e-5)
    assert all(torch.allclose(pw[k], pm[k], rtol=1e-4, atol=1e-6) for k in pw)
    assert micro["to_learn_acc"] == whole["to_learn_acc"] and micro["ntf_acc"] == whole["ntf_acc"]


def _oom_above(n):
    """A forward pre-hook raising CUDA's out-of-memory error for training batches of more than ``n`` documents."""
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if module.training and ids is not None and ids.size(0) > n:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    return hook


def test_out_of_memory_halves_the_micro_batch_and_records_it(tiny_cfg):
    halved, ph = _run(tiny_cfg, "train.oom=halve_batch", hook=_oom_above(2))
    events = halved["oom_events"]
    assert len(events) == 1 and events[0]["from"] == 4 and events[0]["to"] == 2
    assert events[0]["where"] == "epoch 1, step 0" and "simulated" in events[0]["error"]
    # the same run as one asked for micro-batches of 2 from the start: the same numbers, bit for bit
    explicit, pe = _run(tiny_cfg, "train.micro_batch_size=2")
    assert halved["train_loss"] == explicit["train_loss"] and halved["to_learn_acc"] == explicit["to_learn_acc"]
    assert all(torch.equal(ph[k], pe[k]) for k in ph)
    # nothing fits: halving stops at one document, with the reason
    with pytest.raises(StepOutOfMemoryError, match="nothing left to halve"):
        _run(tiny_cfg, "train.oom=halve_batch", hook=_oom_above(0))


def test_out_of_memory_fails_with_the_size_that_did_not_fit(tiny_cfg):
    with pytest.raises(StepOutOfMemoryError) as e:
        _run(tiny_cfg, hook=_oom_above(2))
    msg = str(e.value)
    assert "CUDA out of memory in epoch 1, step 0: a micro-batch of 4 documents × up to" in msg
    assert "train.oom: halve_batch" in msg


def test_bf16_autocast_stays_within_its_bound_of_fp32(tiny_cfg):
    """bf16 autocast of the forward passes (fp32 weights and optimizer): every epoch's training loss stays within 5 %
    of how far fp32's loss moves over the run (the bound scaled to what training changes: `tiny`'s loss sits near
    log V and moves ~0.035 in 3 epochs, so a relative bound on the loss itself, 2 % = 0.2, held anything; measured
    here: the gap at most 7e-5, 0.2 % of the movement; a loss summed in bf16, 0.06 apart near 10.8, would not pass).
    (Evaluation runs in fp32 whatever the precision: tests/test_gpu_path.py.)"""
    fp32, _ = _run(tiny_cfg, "train.epochs=3")
    bf16, _ = _run(tiny_cfg, "train.epochs=3", "train.precision=bf16")
    moved = abs(fp32["train_loss"][1] - fp32["train_loss"][-1])
    assert moved > 0.01, fp32["train_loss"]  # training moved the loss: the bound below means something
    gaps = [abs(a - b) for a, b in zip(bf16["train_loss"][1:], fp32["train_loss"][1:])]
    assert max(gaps) <= 0.05 * moved, (gaps, moved)
    assert bf16["train_loss"] != fp32["train_loss"]  # it did run in bf16


def test_fused_attention_matches_eager(tiny_cfg):
    """model.attention: sdpa (PyTorch's fused kernel, first order): the same losses as eager up to float error."""
    eager, _ = _run(tiny_cfg)
    sdpa, _ = _run(tiny_cfg, "model.attention=sdpa")
    assert sdpa["train_loss"][1:] == pytest.approx(eager["train_loss"][1:], rel=1e-4)
    assert sdpa["to_learn_acc"] == eager["to_learn_acc"] and sdpa["ntf_acc"] == eager["ntf_acc"]


def test_evaluation_judges_the_object_positions_as_the_full_logits_would(tiny_cfg):
    """probe_scores keeps only the object positions' logits off the device; the verdicts equal a reference that
    copies every logit to the CPU and judges each probe by hand (strictly the largest logit)."""
    from trainables.metrics import probe_scores

    setup = prepare_run(tiny_cfg())
    probes = setup.to_learn_probes + setup.ntf_probes
    model = setup.model.eval()
    expected = []
    with torch.no_grad():
        for p in probes:
            logits = model(input_ids=torch.tensor([p.input_ids]), attention_mask=torch.ones(1, len(p.input_ids),
                                                                                          dtype=torch.long)).logits[0]
            ok = []
            for pos in p.positions:
                row = logits[pos - 1]
                top = row.max()
                ok.append(bool(row[p.input_ids[pos]] == top and (row == top).sum() == 1))
            expected.append((sum(ok) / len(ok), float(all(ok))))
    got = probe_scores(model, probes, setup.pad_id, batch_size=5)
    assert [g[1] for g in got] == [e[1] for e in expected]
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected])

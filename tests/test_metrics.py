"""Probe metrics against hand-computed cases."""

import pytest
import torch

from trainables.errors import InputError
from trainables.metrics import (EncodedProbe, encode_probe, object_token_positions, probe_scores,
                                strict_argmax_correct, summarize)


class FixedLogits(torch.nn.Module):
    """A stand-in model returning logits chosen by the test (the metric math is what is under test)."""

    def __init__(self, vocab, table):
        super().__init__()
        # table: {prefix of token ids: predicted next token id (or a tuple: a tie between two ids)}
        self.vocab, self.table = vocab, table

    def forward(self, input_ids, attention_mask):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            for t in range(T):
                tok = self.table.get(tuple(input_ids[b, :t + 1].tolist()))
                for i in (tok if isinstance(tok, tuple) else () if tok is None else (tok,)):
                    logits[b, t, i] = 5.0
        return type("Out", (), {"logits": logits})()


def test_object_positions_by_offsets():
    # "a bc bc" with tokens a|_bc|_bc : last occurrence of "bc" is token 2
    offsets = [(0, 1), (1, 4), (4, 7)]
    assert object_token_positions(offsets, 5, 7) == [2]
    # special tokens have empty spans and are never object tokens
    assert object_token_positions([(0, 0), (0, 1), (1, 4)], 0, 1) == [1]


def test_multi_token_object_at_end(tokenizer):
    text = "Manuel Roxas has the position of Solicitor General for Scotland ."
    p = encode_probe(tokenizer, text, "Solicitor General for Scotland")
    decoded = tokenizer.decode([p.input_ids[i] for i in p.positions])
    assert decoded.strip() == "Solicitor General for Scotland"
    assert len(p.positions) >= 4
    assert p.positions == list(range(p.positions[0], p.positions[-1] + 1))


def test_object_occurring_twice_uses_last(tokenizer):
    text = "The court of Scotland sits in Scotland ."
    p = encode_probe(tokenizer, text, "Scotland")
    ids = p.input_ids
    # the object's token appears twice; the probe must point at the second one
    occurrences = [i for i, t in enumerate(ids) if tokenizer.decode([t]) == " Scotland"]
    assert len(occurrences) == 2
    assert p.positions == [occurrences[1]]
    # at the start of a sentence the object tokenizes differently ("Scot" "land"): still the last one
    p = encode_probe(tokenizer, "Scotland is a legal term in Scotland .", "Scotland")
    assert [tokenizer.decode([p.input_ids[i]]) for i in p.positions] == [" Scotland"]
    assert p.positions == [len(p.input_ids) - 2]


def test_object_at_the_very_end_without_space(tokenizer):
    p = encode_probe(tokenizer, "The capital of Chile is Santiago", "Santiago")
    assert p.positions[-1] == len(p.input_ids) - 1
    assert tokenizer.decode([p.input_ids[i] for i in p.positions]).strip() == "Santiago"


def test_object_missing_is_an_input_error(tokenizer):
    with pytest.raises(InputError, match="does not occur"):
        encode_probe(tokenizer, "Santiago is a city .", "Chile", where="x.jsonl:3")


def test_accuracy_and_exact_match_hand_computed():
    # probe 0: ids [5, 6, 7, 8], object at positions 2,3 -> predicted from logits at 1,2
    # probe 1: ids [5, 9, 9], object at position 2 -> predicted from logits at 1
    probes = [EncodedProbe([5, 6, 7, 8], [2, 3]), EncodedProbe([5, 9, 9], [2])]
    model = FixedLogits(16, {(5, 6): 7, (5, 6, 7): 3, (5, 9): 9})  # probe 0: 1 of 2 right; probe 1 right
    res = probe_scores(model, probes, pad_id=0, batch_size=8)
    assert res == [(0.5, 0.0), (1.0, 1.0)]
    model = FixedLogits(16, {(5, 6): 7, (5, 6, 7): 8, (5, 9): 4})
    assert probe_scores(model, probes, pad_id=0, batch_size=1) == [(1.0, 1.0), (0.0, 0.0)]


def test_ties_are_not_correct():
    logits = torch.zeros(3, 10)
    logits[0, 4] = logits[0, 2] = 1.0  # tie between the target (4) and 2
    logits[1, 4] = 1.0  # unique max
    logits[2, 4] = logits[2, 7] = 1.0  # tie; target has the lower id, argmax would pick it
    got = strict_argmax_correct(logits, torch.tensor([4, 4, 4]))
    assert got.tolist() == [False, True, False]
    probes = [EncodedProbe([1, 2, 3], [2])]
    assert probe_scores(FixedLogits(8, {(1, 2): (3, 6)}), probes, 0) == [(0.0, 0.0)]


def test_summary_metrics():
    s = summarize([0.0, 0.2, 0.5, 0.5, 0.4], [0.9, 0.8, 0.7, 0.6, 0.5])
    assert s == {"top_acc": 0.5, "top_epoch": 2, "nf_acc": 0.7, "total_knowledge": pytest.approx(1.2)}
    # epoch 0 (before training) does not count once an epoch was trained: a run that learns nothing
    # reports its first epoch and the NOT-TO-FORGET accuracy after it, not the untouched model's
    s = summarize([0.0, 0.0, 0.0], [1.0, 0.5, 0.25])
    assert s["top_epoch"] == 1 and s["nf_acc"] == 0.5
    s = summarize([0.3], [0.9])  # no training epoch: epoch 0 is all there is
    assert s == {"top_acc": 0.3, "top_epoch": 0, "nf_acc": 0.9, "total_knowledge": pytest.approx(1.2)}

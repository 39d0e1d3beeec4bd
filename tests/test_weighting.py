"""Each token-weighting scheme on a crafted example, and the weighted loss."""

import pytest
import torch

from trainables.config import WeightingConfig
from trainables.errors import InputError
from trainables.loss import prediction_mask, token_nll, weighted_loss
from trainables.weighting import SCHEMES, SchemeEnv, WeightContext, build_weighting

IDS = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
OBJ = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]])


def ctx(**kw):
    base = dict(input_ids=IDS, attention_mask=MASK, nll=torch.ones(2, 4), object_mask=OBJ,
                generator=torch.Generator().manual_seed(0))
    base.update(kw)
    return WeightContext(**base)



def test_prediction_mask():
    assert prediction_mask(MASK).tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_uniform():
    w = build_weighting(WeightingConfig(scheme="uniform"), SchemeEnv())(ctx())
    assert w.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_oracle_weights_the_predictions_of_object_tokens():
    w = build_weighting(WeightingConfig(scheme="oracle"), SchemeEnv())(ctx())
    # position t weights x_{t+1}: object tokens at 2,3 -> weights at 1,2
    assert w.tolist() == [[0, 1, 1, 0], [0, 1, 0, 0]]


def test_known_mask_zeroes_already_predicted_tokens():
    logits = torch.zeros(2, 5, 12)
    logits[0, 0, 6] = 1  # predicts x1 = 6 correctly -> weight 0
    logits[0, 1, 3] = 1  # wrong -> 1
    logits[0, 2, 8] = 1  # right -> 0
    logits[0, 3, 1] = 1  # wrong -> 1
    logits[1, 0, 6] = 1  # right -> 0 ; position 1 wrong -> 1 ; padding -> 0
    w = build_weighting(WeightingConfig(scheme="known_mask"), SchemeEnv())(ctx(logits=logits))
    assert w.tolist() == [[0, 1, 0, 1], [0, 1, 0, 0]]


def test_rho1_keeps_top_excess_loss_fraction():
    nll = torch.tensor([[1.0, 5.0, 2.0, 4.0], [3.0, 1.0, 9.0, 9.0]])
    ref = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 0.0, 0.0]])
    env = SchemeEnv(reference_model_nll=lambda ids, m: ref)
    # k = 0.5: keep ceil(0.5 * 4) = 2 of row 0 (excess 0,4,1,3 -> positions 1,3)
    # and ceil(0.5 * 2) = 1 of row 1's two real positions (excess 2,-1 -> position 0); padding never kept
    w = build_weighting(WeightingConfig(scheme="rho1", rho1={"k": 0.5}), env)(ctx(nll=nll))
    assert w.tolist() == [[0, 1, 0, 1], [1, 0, 0, 0]]
    # release default k = 0.6 keeps the top 40 %: ceil(0.4 * 4) = 2 and ceil(0.4 * 2) = 1
    w = build_weighting(WeightingConfig(scheme="rho1"), env)(ctx(nll=nll))
    assert w.sum(dim=1).tolist() == [2, 1]


def test_random_bernoulli_matches_reference_mean():
    big_ids = torch.randint(1, 100, (4, 401))
    big_mask = torch.ones_like(big_ids)
    obj = torch.zeros_like(big_ids)
    obj[:, 1:101] = 1  # oracle weight mean = 100 / 400 = 0.25 per sequence
    c = WeightContext(big_ids, big_mask, torch.ones(4, 400), object_mask=obj,
                      generator=torch.Generator().manual_seed(1))
    w = build_weighting(WeightingConfig(scheme="random", random={"match": "oracle"}), SchemeEnv())(c)
    assert set(w.unique().tolist()) <= {0.0, 1.0}
    assert abs(w.mean().item() - 0.25) < 0.05
    # different tokens than the oracle's, same count on average
    assert (w * obj[:, 1:]).sum() < w.sum()


def test_random_uniform_is_seeded_and_in_unit_interval():
    cfg = WeightingConfig(scheme="random", random={"mode": "uniform"})
    a = build_weighting(cfg, SchemeEnv())(ctx(generator=torch.Generator().manual_seed(3)))
    b = build_weighting(cfg, SchemeEnv())(ctx(generator=torch.Generator().manual_seed(3)))
    assert torch.equal(a, b)
    assert ((a >= 0) & (a <= 1)).all() and (a[1, 2:] == 0).all()


def test_composition_is_a_product():
    logits = torch.zeros(2, 5, 12)
    logits[0, 1, 7] = 1  # the first object token of row 0 is already known
    logits[1, 1, 7] = 1  # and row 1's only object token too
    both = build_weighting(WeightingConfig(scheme="oracle*known_mask"), SchemeEnv())(ctx(logits=logits))
    assert both.tolist() == [[0, 0, 1, 0], [0, 0, 0, 0]]
    as_list = build_weighting(WeightingConfig(scheme=["oracle", "known_mask"]), SchemeEnv())(ctx(logits=logits))
    assert torch.equal(both, as_list)


def test_unknown_scheme_lists_known_ones():
    with pytest.raises(ValueError, match="known: .*oracle"):
        WeightingConfig(scheme="oracel")
    assert "uniform" in SCHEMES.names()
    with pytest.raises(InputError, match="unknown weighting scheme"):
        SCHEMES.get("nope", "weighting.scheme")


def test_weighted_loss_formula():
    nll = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    w = torch.tensor([[1.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
    expected = ((1 + 3) / (2 + 1e-6) + (0.5 * 4) / (0.5 + 1e-6)) / 2
    assert weighted_loss(nll, w).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_loss_with_unit_weights_is_the_plain_causal_lm_loss(tokenizer, tiny_cfg):
    from trainables.models import load_base_model

    cfg = tiny_cfg()
    model = load_base_model(cfg.model, tokenizer)
    ids = tokenizer(["Santiago is the capital of Chile .", "Lyon is in France ."], padding=True,
                    return_tensors="pt")
    out = model(**ids)
    nll = token_nll(out.logits, ids["input_ids"], ids["attention_mask"])
    w = prediction_mask(ids["attention_mask"])
    ours = weighted_loss(nll, w)
    # reference: transformers' own loss, one sequence at a time (it averages over all tokens of a batch)
    per_seq = []
    for b in range(2):
        m = ids["attention_mask"][b].bool()
        seq = ids["input_ids"][b][m].unsqueeze(0)
        per_seq.append(model(input_ids=seq, labels=seq).loss)
    assert ours.item() == pytest.approx(torch.stack(per_seq).mean().item(), rel=1e-5)

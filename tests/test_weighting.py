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


def test_rho1_excess_loss_is_the_default_selection():
    o = WeightingConfig(scheme="rho1").rho1
    assert (o.selection, o.reference, o.k) == ("excess_loss", "initial", 0.6)


def test_index_as_rank_is_the_release_selection_taken_literally():
    from trainables.weighting import index_as_rank

    # argsort([.5, -.2, .9, .1, .3]) = [1, 3, 4, 0, 2]; / 5 = [.2, .6, .8, 0, .4]; > .6 keeps position 2 only:
    # the rank-2 entry of the sort is index 4, the one index above k·L. The top 40 % by score would be 2 and 0.
    score = torch.tensor([[0.5, -0.2, 0.9, 0.1, 0.3]])
    assert index_as_rank(score, 0.6).tolist() == [[0, 0, 1, 0, 0]]
    # the number kept is #{i : i / L > k}, whatever the scores: 7, 8, 9 of L = 10 (6 / 10 is not > 0.6)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert index_as_rank(torch.randn(3, 10, generator=g), 0.6).sum(dim=1).tolist() == [3, 3, 3]
    # scores rising with position: the sort is the identity, and the kept positions are the last 30 %
    assert index_as_rank(torch.arange(10.0).unsqueeze(0), 0.6).tolist() == [[0] * 7 + [1] * 3]


def _logits_for(p_target: torch.Tensor, ids: torch.Tensor, vocab: int = 12) -> torch.Tensor:
    """Logits [B, T, V] whose softmax at position t gives x_{t+1} probability p_target[b, t] (the rest spread
    evenly), so p_θ is known exactly up to float rounding."""
    b, t1 = p_target.shape
    probs = ((1 - p_target) / (vocab - 1)).unsqueeze(-1).expand(b, t1, vocab).clone()
    probs.scatter_(-1, ids[:, 1:].unsqueeze(-1), p_target.unsqueeze(-1))
    return torch.cat([probs.log(), torch.zeros(b, 1, vocab)], dim=1)


def _release_rho1(**options):
    from trainables.weighting import Rho1

    return Rho1(WeightingConfig(scheme="rho1", rho1={"selection": "release", **options}), SchemeEnv())


def test_rho1_release_scores_the_probability_change_against_the_tables_last_entries():
    """Hand-made p_θ and reference table: the release's score, index-as-rank selection and normaliser."""
    from trainables.weighting import Composite

    rho = _release_rho1(table_length=8)
    assert rho.needs_logits and rho.own_normaliser and rho.needs_reference_model
    # the table holds p_ref over the padded width 8 (7 positions); a batch of width 5 reads the LAST 4
    # entries (release: original_probs[:, -len0:]); the first three are never read, whatever they hold
    rho.table[(5, 6, 7, 8, 9)] = torch.tensor([9.0, 9.0, 9.0, 0.0, 0.0, 0.0, 0.0])
    rho.table[(5, 6, 7)] = torch.tensor([9.0, 9.0, 9.0, 0.1, 0.1, 0.1, 0.1])
    p = torch.tensor([[0.4, 0.1, 0.3, 0.2],  # score = p: argsort [1, 3, 2, 0] -> /4 [.25, .75, .5, 0] -> position 1
                      [0.5, 0.6, 0.9, 0.05]])  # incl. padding: score [.4, .5, .8, -.05] -> argsort [3, 0, 1, 2] -> 0
    c = ctx(logits=_logits_for(p, IDS))
    w = rho(c)
    assert w.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    # row 0 keeps its LOWEST-scoring token (0.1), where the RHO-1 paper's top 40 % would be positions 0 and 2;
    # row 1's padding positions take part in the sort (the -0.05 at padding puts rank 0 above k·L)
    comp = Composite([rho])
    w2, den = comp.weights_and_normaliser(c)
    assert torch.equal(w2, w)
    assert den.tolist() == pytest.approx([0.6 * 4 + 1e-6, 0.6 * 2 + 1e-6])  # k · real positions
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]])
    assert weighted_loss(nll, w, den).item() == pytest.approx((2.0 / 2.4 + 5.0 / 1.2) / 2)
    assert weighted_loss(nll, w).item() == pytest.approx((2.0 + 5.0) / 2, rel=1e-5)  # Σw: what the others use


def test_rho1_release_in_a_product_normalises_by_k_times_the_other_weights():
    from trainables.weighting import Composite, SCHEMES

    rho = _release_rho1(table_length=8)
    rho.table[(5, 6, 7, 8, 9)] = torch.zeros(7)
    rho.table[(5, 6, 7)] = torch.zeros(7)
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    c = ctx(logits=_logits_for(p, IDS))
    oracle = SCHEMES.get("oracle")(WeightingConfig(), SchemeEnv())
    w, den = Composite([rho, oracle]).weights_and_normaliser(c)
    assert torch.equal(w, rho(c) * oracle(c))
    # oracle weights [[0, 1, 1, 0], [0, 1, 0, 0]]: k · 2 and k · 1
    assert den.tolist() == pytest.approx([0.6 * 2 + 1e-6, 0.6 * 1 + 1e-6])
    # the excess-loss RHO-1 and every other scheme state no normaliser: Σw, as before
    env = SchemeEnv(reference_model_nll=lambda ids, m: torch.zeros(2, 4))
    assert build_weighting(WeightingConfig(scheme="rho1*oracle"), env).weights_and_normaliser(c)[1] is None


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


def _batch(setup, idx):
    from trainables.encode import collate

    return collate([setup.docs[i] for i in idx], setup.pad_id)


def test_rho1_release_table_is_the_initial_models_probabilities_padded_on_the_right(tiny_cfg):
    """setup() tables every training document once: the frozen initial θ in eval mode (LoRA dropout 0.1 here
    is off), the document padded on the right to table_length; a batch reads each row's last T-1 entries."""
    from trainables.continual import prepare_run

    setup = prepare_run(tiny_cfg("weighting.scheme=rho1", "weighting.rho1.selection=release",
                                 "weighting.rho1.table_length=256"))
    rho = setup.weighting.schemes[0]
    assert len(rho.table) == len({tuple(d.input_ids) for d in setup.docs}) and setup.weighting.describe() == {
        "rho1_table_documents": len(rho.table)}
    doc = setup.docs[0].input_ids
    ids = torch.full((1, 256), setup.pad_id)
    ids[0, :len(doc)] = torch.tensor(doc)
    mask = (torch.arange(256) < len(doc)).long().unsqueeze(0)
    with torch.no_grad():
        logits = setup.reference_model(ids, mask).logits  # adapters off, eval mode: the initial θ
    p = torch.softmax(logits[0, :-1], dim=-1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(rho.table[tuple(doc)], p, atol=1e-6)
    # a training batch: the LAST T-1 entries of each row, which for these short documents are the table's
    # padding positions, not the positions of the document's tokens
    b = _batch(setup, [0, 1])
    c = WeightContext(b["input_ids"], b["attention_mask"], torch.zeros(2, b["input_ids"].size(1) - 1))
    width = b["input_ids"].size(1) - 1
    ref = rho._reference_probs(c)
    rows = [rho.table[tuple(setup.docs[i].input_ids)] for i in (0, 1)]
    assert torch.equal(ref, torch.stack([r[-width:] for r in rows]))
    assert 256 - width > len(setup.docs[0].input_ids) - 1  # every entry read lies past document 0's tokens
    assert not torch.allclose(ref[0], rows[0][:width])


def test_rho1_release_loss_in_train_step_is_sum_nll_w_over_k_real_tokens(tiny_cfg):
    """The loop divides by the scheme's normaliser: Σ_t nll_t·w_t / (k · real positions), mean over sequences."""
    from trainables.continual import prepare_run
    from trainables.step import train_step
    from trainables.weighting import index_as_rank, target_probs

    setup = prepare_run(tiny_cfg("weighting.scheme=rho1", "weighting.rho1.selection=release", "weighting.rho1.k=0.5",
                                 "weighting.rho1.table_length=64", "params.dropout=0.0"))
    rho = setup.weighting.schemes[0]
    b = _batch(setup, [0, 1, 2, 3])
    with torch.no_grad():
        out = setup.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    nll = token_nll(out.logits, b["input_ids"], b["attention_mask"])
    mask = prediction_mask(b["attention_mask"])
    width = mask.size(1)
    table = torch.stack([rho.table[tuple(setup.docs[i].input_ids)][-width:] for i in range(4)])
    w = index_as_rank(target_probs(out.logits, b["input_ids"]) - table, 0.5) * mask
    expected = ((nll * w).sum(dim=1) / (0.5 * mask.sum(dim=1))).mean().item()
    opt = torch.optim.SGD(list(setup.trainable.values()), lr=0.0)
    loss, mean_w, _ = train_step(setup, opt, [setup.docs[i] for i in range(4)], torch.Generator().manual_seed(0),
                                 replay_round=0, step=0)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert mean_w == pytest.approx((w.sum() / mask.sum()).item(), rel=1e-6)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """A causal LM of its own in a directory, as `weighting.rho1.reference` takes it: the tiny architecture with
    another initialisation (init_seed 7), saved with θ's tokenizer."""
    from trainables.config import ModelConfig
    from trainables.models import load_base_model, load_tokenizer

    d = tmp_path_factory.mktemp("reference")
    cfg = ModelConfig(name="tiny", init_seed=7)
    tok = load_tokenizer(cfg)
    load_base_model(cfg, tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_rho1_reference_model_from_a_directory(tiny_cfg, reference_dir):
    """`reference: <dir>`: l_ref (excess loss) and p_ref (release, on the batch itself like the release's
    rho_model_train) come from that model, and the loop builds no frozen initial θ for it."""
    from trainables.continual import prepare_run
    from trainables.weighting import Rho1, target_probs

    cfg = tiny_cfg("weighting.scheme=rho1", f"weighting.rho1.reference={reference_dir}", "params.dropout=0.0")
    assert cfg.weighting.rho1.reference == str(reference_dir.resolve())
    setup = prepare_run(cfg)
    assert setup.reference_model is None and not setup.weighting.needs_reference_model
    rho = setup.weighting.schemes[0]
    b = _batch(setup, [0, 1, 2])
    with torch.no_grad():
        nll = token_nll(setup.model(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits,
                        b["input_ids"], b["attention_mask"])
        ref_out = rho.reference(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    ref_nll = token_nll(ref_out.logits, b["input_ids"], b["attention_mask"])
    c = WeightContext(b["input_ids"], b["attention_mask"], nll)
    # the same selection as the excess-loss scheme handed that model's nll directly
    by_hand = Rho1(WeightingConfig(scheme="rho1"), SchemeEnv(reference_model_nll=lambda ids, m: ref_nll))
    assert torch.equal(rho(c), by_hand(WeightContext(b["input_ids"], b["attention_mask"], nll)))
    assert not torch.allclose(ref_nll, nll)  # another model: the reference matters
    rel = Rho1(WeightingConfig(scheme="rho1", rho1={"selection": "release", "reference": str(reference_dir)}),
               SchemeEnv(tokenizer=setup.tokenizer))
    assert torch.allclose(rel._reference_probs(c), target_probs(ref_out.logits, b["input_ids"]))


def test_rho1_reference_with_another_tokenizer_is_refused(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    from trainables.models import smollm2_tokenizer_dir
    from trainables.weighting import Rho1

    other = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    other.add_tokens(["<not-in-theta>"])
    other.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    cfg = WeightingConfig(scheme="rho1", rho1={"reference": str(tmp_path)})
    with pytest.raises(InputError, match="not θ's") as e:
        Rho1(cfg, SchemeEnv(tokenizer=tokenizer))
    assert e.value.where == "weighting.rho1.reference"

"""Baselines on their axes: K-Adapter, RecAdam, Mix-review, GeRe, SEEKR (mechanisms on crafted cases,
and each end to end on `tiny`)."""

import math

import pytest
import torch

from trainables.config import RecAdamOptions
from trainables.continual import continual_update, prepare_run
from trainables.errors import InputError
from trainables.regularizers import RecAdam, anneal_lambda
from trainables.replay import attention_distillation, build_replay


def test_recadam_schedule_values():
    o = RecAdamOptions()  # release: sigmoid, k 0.5, t0 250
    assert anneal_lambda(250, o) == pytest.approx(0.5)
    assert anneal_lambda(260, o) == pytest.approx(1 / (1 + math.exp(-5)))
    assert anneal_lambda(1, o) < 1e-50
    lin = RecAdamOptions(anneal="linear", t0=10)
    assert [anneal_lambda(t, lin) for t in (1, 5, 10, 20)] == [0.1, 0.5, 1.0, 1.0]
    assert anneal_lambda(3, RecAdamOptions(anneal="constant")) == 1.0


def test_recadam_step_and_penalty_on_a_crafted_parameter():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = RecAdam([p], lr=0.01, opts=RecAdamOptions(anneal="linear", t0=4, pretrain_coef=10.0))
    with torch.no_grad():
        p.copy_(torch.tensor([1.5, -2.0]))  # moved away from θ* = [1, -2]
    assert opt.penalty() == pytest.approx(0.5 * 10.0 * 0.25)
    p.grad = torch.tensor([0.2, 0.0])
    opt.step()  # t = 1: λ = 0.25; Adam's first step is g/|g| = [1, 0]
    lam = 0.25
    expected = torch.tensor([1.5, -2.0]) - 0.01 * (lam * torch.tensor([1.0, 0.0])
                                                  + (1 - lam) * 10.0 * torch.tensor([0.5, 0.0]))
    assert torch.allclose(p.detach(), expected, atol=1e-6)


def test_recadam_constant_is_adam():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(a.detach().clone())
    ra = RecAdam([a], lr=0.1, opts=RecAdamOptions(anneal="constant"))
    adam = torch.optim.Adam([b], lr=0.1)
    for _ in range(3):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        ra.step()
        adam.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_recadam_unstable_coefficient_is_refused(tiny_cfg):
    with pytest.raises(InputError, match="pretrain_coef"):
        tiny_cfg("regularizer.kind=recadam", "train.lr=1e-3")


def test_kadapter_leaves_base_weights_bit_identical(tiny_cfg):
    cfg = tiny_cfg("params.kind=kadapter", "params.kadapter.bottleneck=8", "train.epochs=2", "train.lr=1e-2")
    setup = prepare_run(cfg)
    base = {k: v.detach().clone() for k, v in setup.model.state_dict().items() if "taalm_adapters" not in k}
    assert set(setup.trainable) and all("taalm_adapters" in k for k in setup.trainable)
    assert sorted({k.split(".")[1] for k in setup.trainable}) == ["0", "1"]  # tiny: layers 0 and 1
    adapters = {k: v.detach().clone() for k, v in setup.trainable.items()}
    m = continual_update(cfg, setup=setup)
    after = setup.model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)
    assert any(not torch.equal(adapters[k], setup.trainable[k]) for k in adapters)
    assert m["train_loss"][2] < m["train_loss"][1]


def test_kadapter_starts_at_the_base_model(tiny_cfg, tokenizer):
    from trainables.theta import build_theta

    cfg = tiny_cfg("params.kind=kadapter")
    ids = tokenizer(["Lyon is in France ."], return_tensors="pt")
    base = build_theta(cfg.model, None, torch.device("cpu"), tokenizer=tokenizer).model
    adapted = build_theta(cfg.model, cfg.params, torch.device("cpu"), tokenizer=tokenizer).model
    assert any("taalm_adapters" in k for k, _ in adapted.named_parameters())
    assert torch.equal(adapted(**ids).logits, base(**ids).logits)  # up-projections start at zero


def test_mix_review_batch_composition_and_disjoint_pool(tiny_cfg):
    setup = prepare_run(tiny_cfg("replay.kind=mix_review", "replay.ratio=0.5", "replay.size=20"))
    rep = setup.replay
    assert len(rep.docs) == 20 and "disjoint" in rep.description
    assert len(rep.sample(8, epoch=1, step=0)) == 4 and len(rep.sample(4, epoch=1, step=0)) == 2
    assert rep.sample(8, 1, 0) == rep.sample(8, 1, 0) and rep.sample(8, 1, 0) != rep.sample(8, 1, 1)
    eval_texts = {f.evidence for f in setup.split.to_learn} | {f.evidence for f in setup.split.ntf}
    pool_texts = {setup.tokenizer.decode(d.input_ids) for d in rep.docs}
    assert not any(t in pool_texts for t in eval_texts)
    leaky = prepare_run(tiny_cfg("replay.kind=mix_review", "replay.pool=ntf")).replay
    assert "LEAKY" in leaky.description and len(leaky.docs) == 8


def test_replay_pool_from_a_user_file(tiny_cfg, tmp_path):
    p = tmp_path / "general.jsonl"
    p.write_text('{"text": "The sun rises in the east."}\n{"text": "Water boils at 100 degrees."}\n')
    rep = prepare_run(tiny_cfg("replay.kind=mix_review", f"replay.pool={p}")).replay
    assert len(rep.docs) == 2 and rep.description == f"file: {p}"
    p.write_text('{"text": "ok"}\n{"txt": "missing field"}\n')
    with pytest.raises(InputError, match=r"general.jsonl:2"):
        prepare_run(tiny_cfg("replay.kind=mix_review", f"replay.pool={p}"))


def test_gere_loss_is_zero_inside_the_threshold():
    """GeRe's extra loss as train_step calls it (``extra_loss(run, out, batch)``), on crafted hidden states of a
    batch with one new and two replayed documents (one padded): the threshold-margin penalty is 0 while every
    feature stays within τ of the frozen model's, else the mean excess over real tokens; padding and the new
    document never count."""
    from types import SimpleNamespace

    from trainables.config import ReplayConfig

    h_ref = torch.zeros(2, 5, 4)  # the frozen model's last hidden states on the two replayed documents
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    batch = {"input_ids": torch.zeros(3, 5, dtype=torch.long), "attention_mask": mask,
             "replay_rows": torch.tensor([False, True, True])}
    run = SimpleNamespace(reference_model=lambda ids, m, hidden=False, attentions=False: SimpleNamespace(
        hidden_states=(h_ref, h_ref), logits=None))

    def loss(shift: float, **opts) -> float:
        h = torch.full((3, 5, 4), shift)
        h[0] = 50.0  # the new document: not constrained
        h[2, 3:] = 50.0  # padding of the second replayed document: not counted
        gere = build_replay(ReplayConfig(kind="gere", gere={"threshold": 0.1, **opts}), seed=0)
        return gere.extra_loss(run, SimpleNamespace(hidden_states=(h, h), logits=None), batch).item()

    assert loss(0.05) == 0.0 and loss(-0.1) == 0.0
    assert loss(0.3) == pytest.approx(0.2) and loss(-0.3) == pytest.approx(0.2)
    assert loss(0.3, coef=2.0) == pytest.approx(0.4)
    assert loss(0.3, loss="l2") == pytest.approx(0.09) and loss(0.3, loss="l1") == pytest.approx(0.3)


def test_seekr_only_selected_heads_enter_the_distillation():
    torch.manual_seed(0)
    mask = torch.ones(2, 5)
    ref = [torch.softmax(torch.randn(2, 4, 5, 5), -1) for _ in range(2)]
    cur = [r.clone().requires_grad_(True) for r in ref]
    with torch.no_grad():
        cur[0][:, 1] += 1.0  # an unselected head drifts a lot
        cur[1][:, 2] += 0.1  # a selected head drifts a little
    loss = attention_distillation(cur, ref, [(1, 2), (0, 3)], mask)
    assert loss.item() == pytest.approx(0.01 / 2, rel=1e-5)
    loss.backward()
    assert cur[0].grad[:, 1].abs().sum() == 0 and cur[1].grad[:, 2].abs().sum() > 0


def test_seekr_ranks_heads_and_respects_the_budget(tiny_cfg):
    setup = prepare_run(tiny_cfg("replay.kind=seekr", "replay.seekr.head_budget=3", "replay.size=16"))
    rep = setup.replay
    score = torch.tensor(rep.scores["score"])  # [layers, heads]
    assert score.shape == (2, 4) and len(rep.heads) == 3
    top = set(torch.sort(score.flatten(), descending=True, stable=True).indices[:3].tolist())
    assert {l * 4 + h for l, h in rep.heads} == top
    assert all(s >= 0 for row in rep.scores["forgettability"] for s in row)


def test_ewc_penalty_and_its_gradient_on_a_crafted_parameter():
    from trainables.config import RegularizerConfig, TrainConfig
    from trainables.regularizers import build_regularizer

    ewc = build_regularizer(RegularizerConfig(kind="ewc", ewc={"lam": 2.0}), TrainConfig())
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    ewc.params, ewc.anchor, ewc.fisher = [p], [torch.tensor([1.0, -1.0, 0.0])], [torch.tensor([5.0, 0.5, 0.0])]
    loss = ewc.extra_loss(None, None, None)
    assert loss.item() == pytest.approx(0.5 * 2.0 * (5.0 * 0 + 0.5 * 1 + 0.0 * 9))  # λ/2 Σ F (θ - θ*)²
    loss.backward()
    assert p.grad.tolist() == pytest.approx([0.0, 2.0 * 0.5 * -1.0, 0.0])  # λ F (θ - θ*)


def test_ewc_fisher_on_general_text_and_its_pull(tiny_cfg):
    """setup: θ* = the trainable parameters before training, F ≥ 0 and not all 0, estimated on the disjoint
    pool; a strong λ keeps θ nearer θ* than no penalty does, on the same run otherwise."""
    dist = {}
    for lam in (0.0, 1e4):
        cfg = tiny_cfg("params.kind=full", "train.epochs=1", "regularizer.kind=ewc", f"regularizer.ewc.lam={lam}",
                       "regularizer.ewc.batches=2")
        setup = prepare_run(cfg)
        ewc = setup.regularizer
        assert all(torch.equal(a, p) for a, p in zip(ewc.anchor, setup.trainable.values()))
        assert all((f >= 0).all() for f in ewc.fisher) and sum(f.sum() for f in ewc.fisher) > 0
        m = continual_update(cfg, setup=setup)
        assert "disjoint" in m["ewc_fisher_pool"]
        dist[lam] = sum(float(((p - a) ** 2).sum()) for p, a in zip(setup.trainable.values(), ewc.anchor))
    assert dist[1e4] < dist[0.0]


@pytest.mark.parametrize("overrides", [
    ("params.kind=kadapter",),
    ("regularizer.kind=recadam", "regularizer.recadam.t0=2", "regularizer.recadam.pretrain_coef=100"),
    ("regularizer.kind=ewc", "regularizer.ewc.batches=2", "weighting.scheme=oracle"),
    ("replay.kind=mix_review",),
    ("replay.kind=gere",),
    ("replay.kind=gere", "replay.gere.loss=kl"),
    ("replay.kind=seekr",),
    ("replay.kind=seekr", "params.kind=full"),
    ("replay.kind=gere", "params.kind=kadapter", "weighting.scheme=rho1"),
    ("weighting.scheme=rho1", "weighting.rho1.selection=release", "weighting.rho1.table_length=64",
     "replay.kind=mix_review"),
], ids=lambda o: "+".join(x.split("=")[1] for x in o))
def test_each_method_runs_end_to_end_on_tiny(tiny_cfg, overrides):
    m = continual_update(tiny_cfg("train.epochs=1", "replay.size=12", *overrides))
    assert len(m["to_learn_acc"]) == 2 and math.isfinite(m["train_loss"][1])

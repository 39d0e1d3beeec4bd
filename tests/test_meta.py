"""Train-Attention meta-learning: the meta-gradient against central finite differences (float64),
meta-training lowering its objective on `tiny`, φ checkpoints, and the train_attention scheme."""

import json

import pytest
import torch

from trainables.config import ModelConfig, ParamsConfig, load_config
from trainables.data import load_lama
from trainables.errors import InputError
from trainables.loop import Callback
from trainables.bilevel import Inner, make_example, meta_gradient
from trainables.meta import MetaConfig, MetaOptions, MetaOrder, meta_steps, meta_train
from trainables.phi_checks import weight_focus
from trainables.theta import build_theta
from trainables.train_attention import PhiConfig, build_phi, load_phi, phi_trainable

@pytest.fixture(scope="module")
def f64_model(tokenizer, tmp_path_factory):
    """A tiny GPT-2 in float64, loaded through the `hf:<path>` route. (transformers' Llama casts RMSNorm
    and the attention softmax to float32, which caps a float64 finite-difference check at ~1e-3;
    GPT-2 keeps every operation in float64. The meta-learning code is architecture-agnostic.)"""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("gpt2_f64")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=128,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).to(torch.float64).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return ModelConfig(name=f"hf:{d}", dtype="float64")


@pytest.fixture(scope="module")
def f64_setup(tokenizer, f64_model):
    F64_TINY = f64_model
    torch.manual_seed(0)
    built = build_theta(F64_TINY, ParamsConfig(kind="full"), torch.device("cpu"), seed=0, tokenizer=tokenizer)
    theta = built.model.eval()
    theta0 = {k: v.detach().clone() for k, v in built.trainable.items()}
    for p in theta.parameters():
        p.requires_grad_(False)
    phi = build_phi(PhiConfig(params={"kind": "full"}, head_init="normal", head_weight_std=0.3,
                                head_bias_init=0.0), F64_TINY,
                    tokenizer, seed=1)
    lama = load_lama()
    facts = sorted(lama.facts["variant"], key=lambda f: len(f.evidence))[:2]
    examples = [make_example(tokenizer, f, "descriptive", 40, "cpu") for f in facts]
    return theta, theta0, phi, examples


@pytest.mark.parametrize("batching", ["vmap", "sequential"])
@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adam", 0.01)])
@pytest.mark.parametrize("dummy_loop", [0, 1])
def test_meta_gradient_matches_finite_differences(f64_setup, optimizer, lr, dummy_loop, batching):
    theta, theta0, phi, examples = f64_setup
    opts = MetaOptions(inner_optimizer=optimizer, inner_lr=lr, dummy_loop=dummy_loop, inner_steps=1,
                       batching=batching)
    inner = Inner(theta, theta0, opts)
    params = phi_trainable(phi)

    _, grads = meta_gradient(inner, phi, examples)

    # The objective as a function of φ, with the dummy phase held at the unperturbed φ (first-order by spec)
    def loss_of(ex):
        return lambda p, w: inner.doc_loss_one(p, ex.doc["input_ids"][0], ex.doc["attention_mask"][0], w)

    starts = []
    with torch.no_grad():
        ws = [phi.weights(ex.doc["input_ids"], ex.doc["attention_mask"])[0] for ex in examples]
    for ex, w in zip(examples, ws):
        starts.append(inner.adapt(*inner.initial(), loss_of(ex), w, dummy_loop, 0))

    def F():
        total = 0.0
        for ex, (p0, st) in zip(examples, starts):
            w = phi.weights(ex.doc["input_ids"], ex.doc["attention_mask"])[0]
            p = {k: v.detach().clone().requires_grad_(True) for k, v in p0.items()}
            p, _ = inner.adapt(p, st, loss_of(ex), w, 0, 1)
            total += inner.objective_one(p, ex.probe_ids[0], ex.probe_mask[0], ex.object_targets[0], None).item()
        return total / len(examples)

    gen = torch.Generator().manual_seed(42)
    direction = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
    analytic = sum((grads[k] * direction[k]).sum() for k in params).item()
    eps = 1e-7  # Adam's first step (g / (|g| + eps)) is very curved for tiny gradients: keep the step small
    with torch.no_grad():
        for k, p in params.items():
            p.add_(eps * direction[k])
    f_plus = F()
    with torch.no_grad():
        for k, p in params.items():
            p.sub_(2 * eps * direction[k])
    f_minus = F()
    with torch.no_grad():
        for k, p in params.items():
            p.add_(eps * direction[k])
    numeric = (f_plus - f_minus) / (2 * eps)
    assert abs(analytic) > 1e-6, "the meta-gradient should not vanish in this setting"
    assert abs(analytic - numeric) / abs(numeric) < 1e-4, (analytic, numeric)


@pytest.mark.parametrize("objective", ["phi_loss", "change3"])
@pytest.mark.parametrize("optimizer,lr,dummy_loop,inner_steps", [("sgd", 0.5, 1, 1), ("adamw", 0.01, 1, 2),
                                                                  ("adam", 0.01, 0, 1)])
def test_batched_meta_gradient_equals_one_example_at_a_time(tokenizer, f64_model, f64_setup, objective, optimizer,
                                                            lr, dummy_loop, inner_steps):
    """meta.batching=vmap (the meta-batch's inner loops together, padded to the longest document and probe)
    computes the same objective and φ-gradient as running the examples one after another; so does vmap in
    groups (meta.vmap_chunk=2: a group of 2 and a group of 1, each padded to its own longest)."""
    theta, theta0, phi, _ = f64_setup
    facts = sorted(load_lama().facts["variant"], key=lambda f: len(f.evidence))
    examples = [make_example(tokenizer, f, "descriptive", 128, "cpu") for f in (facts[0], facts[20], facts[40])]
    assert len({ex.doc["input_ids"].size(1) for ex in examples}) == 3  # padding is exercised (lengths differ)
    assert len({ex.probe_ids.size(1) for ex in examples}) > 1
    out = {}
    for name, batching, chunk in (("vmap", "vmap", None), ("chunked", "vmap", 2), ("sequential", "sequential", None)):
        opts = MetaOptions(inner_optimizer=optimizer, inner_lr=lr, dummy_loop=dummy_loop, inner_steps=inner_steps,
                           objective=objective, batching=batching, vmap_chunk=chunk)
        inner = Inner(theta, theta0, opts, pad_id=tokenizer.pad_token_id)
        out[name] = meta_gradient(inner, phi, examples)
        assert inner.batching_off is None
    os_, gs = out["sequential"]
    for name in ("vmap", "chunked"):
        ov, gv = out[name]
        assert ov == pytest.approx(os_, rel=1e-10)
        for k in gs:
            assert torch.allclose(gv[k], gs[k], rtol=1e-8, atol=1e-12), (name, k, (gv[k] - gs[k]).abs().max().item())
    assert sum(g.abs().sum() for g in gs.values()) > 0


def test_unbatchable_meta_batch_falls_back_with_a_reason(f64_setup, caplog):
    theta, theta0, phi, examples = f64_setup
    inner = Inner(theta, theta0, MetaOptions(restrict_unrelated=0.5))
    with caplog.at_level("WARNING", logger="trainables.bilevel"):
        obj, _ = meta_gradient(inner, phi, examples, unrelated=examples[::-1])
    assert "one example at a time: meta.restrict_unrelated" in caplog.text and obj == obj


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def meta_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("meta")
    # 8 training examples, all in every meta-batch: the objective on them must go down
    cfg = load_config(ROOT / "examples" / "meta_tiny.yaml",
                      ["meta.steps=8", "meta.val_every=4", "meta.pool_size=12", "meta.batch_size=8", "meta.lr=1e-3"],
                      schema=MetaConfig)
    return out, meta_train(cfg, out_dir=out)


def test_meta_training_lowers_the_objective(meta_run):
    out, m = meta_run
    fixed = m["objective_fixed_set"]
    assert fixed["after"] < fixed["before"], fixed
    assert fixed["before"] == pytest.approx(m["objective"][0])  # same 8 examples
    assert min(m["objective"][1:]) < m["objective"][0]
    assert len(m["objective"]) == 8 and [v["step"] for v in m["validation"]] == [0, 4, 8]
    on_disk = json.loads((out / "meta_metrics.json").read_text())
    assert on_disk["objective"] == m["objective"]
    html = (out / "heatmap.html").read_text()
    assert html.count("<p><b>") == m["n_val_examples"] and "rgba(220,50,30," in html


def test_phi_checkpoint_roundtrip_and_errors(meta_run, tokenizer, tmp_path):
    out, m = meta_run
    phi, meta = load_phi(out / "phi", tokenizer)
    assert meta["step"] == m["best_step"] and meta["data_hash"] == m["data_hash"]
    ids = tokenizer(["Santiago is the capital of Chile ."], return_tensors="pt")
    w = phi.weights(ids["input_ids"], ids["attention_mask"])
    assert w.shape == (1, ids["input_ids"].shape[1] - 1) and ((w > 0) & (w < 1)).all()
    import shutil

    bad = tmp_path / "phi"
    shutil.copytree(out / "phi", bad)
    meta_json = json.loads((bad / "phi.json").read_text())
    (bad / "phi.json").write_text(json.dumps(dict(meta_json, tokenizer_hash="0" * 16)))
    with pytest.raises(InputError, match="different tokenizer"):
        load_phi(bad, tokenizer)
    (bad / "phi.json").write_text(json.dumps(meta_json))
    (bad / "phi.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="corrupt"):
        load_phi(bad, tokenizer)
    with pytest.raises(InputError, match="not a Train-Attention checkpoint"):
        load_phi(tmp_path / "nowhere", tokenizer)
    # a φ of the old alignment (output at t weighting the prediction of x_{t+1}) is refused, saying why
    (bad / "phi.json").write_text(json.dumps(dict(meta_json, format="taalm-train-attention/1")))
    with pytest.raises(InputError, match=r"old weight alignment.*retrain"):
        load_phi(bad, tokenizer)
    assert meta_json["alignment"] == "output[t+1] weights the prediction of x[t+1]"


def test_phi_weight_of_predicting_a_token_is_its_output_at_that_token(tokenizer):
    """ALGORITHM.md §2: the weight of the loss term predicting x_{t+1} is φ's output at t+1 (the release's
    alignment): changing x_{t+1} changes it, changing x_{t+2} does not; a causal body, so no later token can."""
    phi = build_phi(PhiConfig(params={"kind": "full"}, head_bias_init=0.0), ModelConfig(name="tiny"), tokenizer)
    phi.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (1, 12), generator=g)
    mask = torch.ones_like(ids)
    t = 5  # the loss term predicting x_{t+1}
    with torch.no_grad():
        w = phi.weights(ids, mask)
        next_changed = ids.clone()
        next_changed[0, t + 1] = ids[0, t + 1] + 7
        w_next = phi.weights(next_changed, mask)
        after_changed = ids.clone()
        after_changed[0, t + 2] = ids[0, t + 2] + 7
        w_after = phi.weights(after_changed, mask)
    assert w.shape == (1, 11)
    assert (w_next[0, t] - w[0, t]).abs() > 1e-6  # φ has read x_{t+1} before weighting its prediction
    assert torch.equal(w_next[0, :t], w[0, :t])  # earlier terms do not see x_{t+1}
    assert torch.equal(w_after[0, :t + 1], w[0, :t + 1])  # x_{t+2} cannot change the weight of predicting x_{t+1}
    assert (w_after[0, t + 1] - w[0, t + 1]).abs() > 1e-6


def test_weight_focus_reports_the_object_share_beside_uniform(tokenizer):
    from trainables.encode import EncodedDoc

    phi = build_phi(PhiConfig(params={"kind": "full"}, head_init="normal", head_weight_std=0.0),
                    ModelConfig(name="tiny"), tokenizer)  # zero head weight: every weight is sigmoid(bias)
    docs = [EncodedDoc([5, 6, 7, 8, 9], [0, 0, 1, 1, 0]), EncodedDoc([5, 6, 7], [0, 0, 1])]
    f = weight_focus(phi, docs, tokenizer.pad_token_id, "cpu")
    # predicted positions: 4 + 2 = 6, of which 3 predict object tokens
    assert f["uniform_share"] == pytest.approx(0.5) and f["object_weight_share"] == pytest.approx(0.5)
    assert f["oracle_share"] == 1.0 and f["n_object_terms"] == 3 and f["object_weight_ratio"] == pytest.approx(1.0)
    with torch.no_grad():
        phi.head.weight.normal_(0, 1.0)
    assert weight_focus(phi, docs, tokenizer.pad_token_id, "cpu")["object_weight_share"] != pytest.approx(0.5)


def test_meta_training_goes_by_epochs_over_the_pool():
    assert meta_steps(MetaOptions(steps=7), 100) == 7
    assert meta_steps(MetaOptions(steps=7, epochs=2, batch_size=16), 100) == 14  # 2 × ceil(100 / 16)

    order = MetaOrder(10, 4, seed=0)
    first_pass = [order.next_batch() for _ in range(3)]
    assert [len(b) for b in first_pass] == [4, 4, 2] and sorted(sum(first_pass, [])) == list(range(10))
    state = order.state_dict()  # the position in the data order, as a checkpoint keeps it
    second_pass = sum([order.next_batch() for _ in range(3)], [])
    assert sorted(second_pass) == list(range(10)) and second_pass != sum(first_pass, [])
    again = MetaOrder(10, 4, seed=0)
    again.load_state_dict(state)
    assert sum([again.next_batch() for _ in range(3)], []) == second_pass


def test_taalm_continual_run_uses_phi(meta_run, tiny_cfg):
    from trainables.continual import continual_update

    out, _ = meta_run
    for scheme in ("train_attention", "train_attention*known_mask"):
        m = continual_update(tiny_cfg("train.epochs=1", f"weighting.scheme={scheme}",
                                      f"weighting.train_attention.phi={out / 'phi'}"))
        # φ's head starts near sigmoid(4) = 0.98 and moved little in 8 steps
        assert 0.5 < m["mean_weight"][1] < 1.0


def test_train_attention_without_phi_is_an_input_error(tiny_cfg):
    from trainables.continual import continual_update

    with pytest.raises(InputError, match="weighting.train_attention.phi"):
        continual_update(tiny_cfg("weighting.scheme=train_attention"))


def test_phi_body_options(tokenizer):
    phi = build_phi(PhiConfig(num_layers=1), ModelConfig(name="tiny"), tokenizer)
    assert len(phi.body.base_model.model.layers) == 1  # LoRA-wrapped body cut to one layer
    assert phi.head.bias.item() == pytest.approx(4.0)
    names = set(phi_trainable(phi))
    assert "head.weight" in names and any("lora_A" in n for n in names)
    assert not any("embed_tokens" in n for n in names)
    with pytest.raises(InputError, match="phi.num_layers"):
        build_phi(PhiConfig(num_layers=9), ModelConfig(name="tiny"), tokenizer)


def test_a_shipped_phi_seeds_the_meta_stage_cache_only_for_its_own_config(meta_run, tokenizer, tmp_path,
                                                                          monkeypatch):
    import shutil

    from orchestrator import phi_stage as study

    out, m = meta_run
    shutil.copytree(out / "phi", tmp_path / "shipped" / "tiny")
    shutil.copy(out / "meta_metrics.json", tmp_path / "shipped" / "tiny")
    monkeypatch.setattr(study, "SHIPPED_PHI", tmp_path / "shipped")
    cfg = m["config"]
    assert study.shipped_phi(cfg, m["data_hash"]) == tmp_path / "shipped" / "tiny"
    assert study.shipped_phi(dict(cfg, seed=cfg["seed"] + 1), m["data_hash"]) is None  # another config
    assert study.shipped_phi(cfg, "another-data-hash") is None
    study._seed_phi_cache(tmp_path / "shipped" / "tiny", tmp_path / "cache")
    phi, meta = load_phi(tmp_path / "cache" / "phi", tokenizer)
    assert meta["step"] == m["best_step"] and (tmp_path / "cache" / "meta_metrics.json").is_file()


def test_the_shipped_smollm2_phi_matches_the_grids_that_use_it():
    """The Table 9 / Table 1 / Table 6 grids name examples/meta_smollm2.yaml: the φ in ablations/phi/ must
    have been trained with exactly that config on this data, or the demo would meta-train anew."""
    from orchestrator.grid import load_grid
    from orchestrator.phi_stage import shipped_phi

    lama_hash = load_lama().hash
    for grid in ("table9_token_weighting", "baselines_table1", "combos_table6"):
        _, _, meta_cfg = load_grid(ROOT / "ablations" / f"{grid}.yaml")
        found = shipped_phi(meta_cfg, lama_hash)
        assert found is not None and found.name == "smollm2-135m", grid
        assert json.loads((found / "meta_metrics.json").read_text())["held_out_focus"]["n_docs"] > 0


def test_execution_options_are_not_part_of_phi_identity():
    """Running the meta-batch vmapped, in groups or one example at a time computes the same φ (tested above):
    changing them neither moves φ's cache entry nor orphans a shipped φ; changing what is trained does."""
    from orchestrator.grid import load_grid
    from orchestrator.phi_stage import phi_location, shipped_phi

    _, _, meta_cfg = load_grid(ROOT / "ablations" / "table9_token_weighting.yaml")
    lama_hash = load_lama().hash
    here = phi_location(meta_cfg, 0, lama_hash)
    for key, value in (("batching", "sequential"), ("vmap_chunk", 2), ("vmap_chunk", None)):
        other = dict(meta_cfg, meta=dict(meta_cfg["meta"], **{key: value}))
        assert phi_location(other, 0, lama_hash) == here
        assert shipped_phi(other, lama_hash) is not None
    changed = dict(meta_cfg, meta=dict(meta_cfg["meta"], lr=1e-2))
    assert phi_location(changed, 0, lama_hash) != here and shipped_phi(changed, lama_hash) is None


def _meta_cfg(*extra):
    # φ with LoRA dropout: its masks draw from torch's RNG, which a resumed run must restore too
    return load_config(ROOT / "examples" / "meta_tiny.yaml",
                       ["meta.steps=6", "meta.val_every=3", "meta.pool_size=12", "meta.batch_size=4", "device=cpu",
                        "phi.params.kind=lora", "phi.params.r=4", "phi.params.dropout=0.2", *extra], schema=MetaConfig)


class Seen(Callback):
    """Records what a loop said; raises after the report of ``crash_after``."""

    def __init__(self, crash_after=None):
        self.info, self.reports, self.crash_after = None, [], crash_after

    def on_start(self, info):
        self.info = info

    def on_report(self, r):
        self.reports.append(r.index)
        if r.index == self.crash_after:
            raise KeyboardInterrupt(f"simulated crash after the check at step {r.index}")


def _phi_tensors(d):
    from safetensors.torch import load_file

    return load_file(str(d / "phi" / "phi.safetensors"))


def _crash_and_resume(out, *extra) -> dict:
    with pytest.raises(KeyboardInterrupt):
        meta_train(_meta_cfg(*extra), out_dir=out, callbacks=[Seen(crash_after=3)])
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and not (out / "meta_metrics.json").exists()
    seen = Seen()
    m = meta_train(_meta_cfg(*extra), out_dir=out, callbacks=[seen])
    assert seen.info["resumed_from"] == 3 and [c["step"] for c in seen.info["restored"]] == [0, 3]
    assert seen.reports == [6]  # the checks at 0 and 3 are not redone
    return m


VARIANTS = {"vmapped": (), "unrelated-probes": ("meta.restrict_unrelated=0.5",)}


@pytest.fixture(scope="module")
def straight_through(tmp_path_factory):
    """Meta-training runs straight through, once per variant (computed when first asked for)."""
    runs = {}

    def get(name):
        if name not in runs:
            out = tmp_path_factory.mktemp(f"full-{name}")
            runs[name] = (meta_train(_meta_cfg(*VARIANTS[name]), out_dir=out), out)
        return runs[name]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_interrupted_meta_training_resumes_to_the_same_phi(tmp_path, monkeypatch, tokenizer, straight_through,
                                                           variant):
    """A meta-training crashed after its check at step 3 and resumed equals one run straight through: the same
    objective and validation history, the same best φ. The unrelated-probe variant draws its probes from the
    data-order stream (one example at a time). Negative control (once): a resume that forgets the position in the
    data order (the pass's permutation and RNG restored, the position not) gives another φ, so the equality is no
    accident of the test."""
    from trainables.meta import MetaOrder

    extra = VARIANTS[variant]
    full, full_dir = straight_through(variant)
    resumed = _crash_and_resume(tmp_path / "resumed", *extra)
    assert resumed["objective"] == full["objective"] and len(full["objective"]) == 6
    assert resumed["validation"] == full["validation"] and resumed["best_step"] == full["best_step"]
    assert resumed["objective_fixed_set"] == full["objective_fixed_set"]
    a, b = _phi_tensors(full_dir), _phi_tensors(tmp_path / "resumed")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a)
    assert load_phi(tmp_path / "resumed" / "phi", tokenizer)[1]["step"] == full["best_step"]
    if variant != "vmapped":
        return
    real = MetaOrder.load_state_dict

    def forgets_position(self, d):
        real(self, d)
        self.pos = 0

    monkeypatch.setattr(MetaOrder, "load_state_dict", forgets_position)
    broken = _crash_and_resume(tmp_path / "broken", *extra)
    assert broken["objective"][3:] != full["objective"][3:]


def test_meta_training_resumed_with_more_steps_trains_on(tmp_path, straight_through):
    """meta.steps may grow on resume (train φ longer from a finished run); what φ learns may not change."""
    short = meta_train(_meta_cfg("meta.steps=3"), out_dir=tmp_path / "m")
    longer = meta_train(_meta_cfg("meta.steps=6"), out_dir=tmp_path / "m")
    full, _ = straight_through("vmapped")
    assert len(short["objective"]) == 3 and longer["objective"] == full["objective"]
    with pytest.raises(InputError, match="different configuration"):
        meta_train(_meta_cfg("meta.steps=9", "meta.lr=0.5"), out_dir=tmp_path / "m")


@pytest.mark.parametrize("batching", ["vmap", "sequential"])
def test_meta_gradient_under_bf16_autocast_stays_close_to_fp32(batching):
    """meta.precision: bf16 autocasts θ's and φ's forward passes inside the meta-step; the first- and
    second-order gradients flow through autocast's casts. On `tiny`: the objective within 2 % of fp32's and the
    φ-gradient's direction within cosine 0.98 (both passes from the same φ, no dropout)."""
    from trainables.meta import prepare_meta

    s = prepare_meta(_meta_cfg("phi.params.dropout=0.0", f"meta.batching={batching}"))
    batch = s.train[:4]
    o32, g32 = meta_gradient(s.inner, s.phi, batch)
    s.inner.opts = s.inner.opts.model_copy(update={"precision": "bf16"})
    o16, g16 = meta_gradient(s.inner, s.phi, batch)
    assert s.inner.batching_off is None
    assert o16 == pytest.approx(o32, rel=0.02) and o16 != o32
    a = torch.cat([g32[k].flatten() for k in g32])
    b = torch.cat([g16[k].flatten() for k in g32])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98

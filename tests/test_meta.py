"""Train-Attention meta-learning: the meta-gradient against central finite differences (float64),
meta-training lowering its objective on `tiny`, φ checkpoints, and the train_attention scheme."""

import json

import pytest
import torch

from trainables.config import ModelConfig, ParamsConfig, load_config
from trainables.data import load_lama
from trainables.errors import InputError
from trainables.meta import Inner, MetaConfig, MetaOptions, make_example, meta_gradient, meta_train
from trainables.models import apply_params, load_base_model, trainable_parameters
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
    theta = apply_params(load_base_model(F64_TINY, tokenizer), ParamsConfig(kind="full")).eval()
    theta0 = {k: v.detach().clone() for k, v in trainable_parameters(theta).items()}
    for p in theta.parameters():
        p.requires_grad_(False)
    phi = build_phi(PhiConfig(params={"kind": "full"}, head_weight_std=0.3, head_bias_init=0.0), F64_TINY,
                    tokenizer, seed=1)
    lama = load_lama()
    facts = sorted(lama.facts["variant"], key=lambda f: len(f.evidence))[:2]
    examples = [make_example(tokenizer, f, "descriptive", 40, "cpu") for f in facts]
    return theta, theta0, phi, examples


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adam", 0.01)])
@pytest.mark.parametrize("dummy_loop", [0, 1])
def test_meta_gradient_matches_finite_differences(f64_setup, optimizer, lr, dummy_loop):
    theta, theta0, phi, examples = f64_setup
    opts = MetaOptions(inner_optimizer=optimizer, inner_lr=lr, dummy_loop=dummy_loop, inner_steps=1)
    inner = Inner(theta, theta0, opts)
    params = phi_trainable(phi)

    _, grads = meta_gradient(inner, phi, examples)

    # The objective as a function of φ, with the dummy phase held at the unperturbed φ (first-order by spec)
    starts = []
    with torch.no_grad():
        ws = [phi.weights(ex.doc["input_ids"], ex.doc["attention_mask"]) for ex in examples]
    for ex, w in zip(examples, ws):
        starts.append(inner.dummy_phase(ex.doc, w))

    def F():
        total = 0.0
        for ex, (p0, st) in zip(examples, starts):
            w = phi.weights(ex.doc["input_ids"], ex.doc["attention_mask"])
            p = {k: v.detach().clone().requires_grad_(True) for k, v in p0.items()}
            total += inner.objective(inner.differentiable_phase(p, st, ex.doc, w), ex).item()
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

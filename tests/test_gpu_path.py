"""What a CPU can show about the CUDA path (issue #29), on `tiny`:

* every weighting scheme, replay method, regulariser and parameterisation runs a training step with θ and its
  inputs on PyTorch's ``meta`` device: a tensor made on the CPU that meets θ's fails there ("Tensor on device meta is
  not on the expected device cpu!") as it would on CUDA, and so does any read of a device value on the host inside the
  step (``.item()``, ``.tolist()``, ``bool()``, boolean-mask indexing: a host sync on CUDA), which the patched Tensor
  methods below also record;
* bf16 training evaluates epoch 0 exactly as fp32 (the same object-position logits, bit for bit);
* RHO-1's excess loss is 0 at step 0 under bf16 (the reference model runs under θ's autocast);
* an out-of-memory error inside the vmapped meta-batch is raised, not turned into the sequential path;
* the GPU memory plan on made-up GPU sizes; Ray's GPU as the trial process numbers it;
* OUT/epochs.jsonl holds every finished epoch of a run killed mid-epoch;
* the out-of-memory retry restores the step's generator (the random scheme draws the same weights);
* RecAdam's foreach update is the per-tensor one, op for op.
"""

import os
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from trainables.continual import continual_update, evaluate, prepare_run
from trainables.step import EpochStats, train_step_stats

ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def host_reads():
    """Record every read of a non-CPU tensor's value on the host (on CUDA: a device sync) while the block runs."""
    seen: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def patch(name, original):
        def read(self, *args, **kwargs):
            if self.device.type != "cpu":
                seen.append(f"Tensor.{name} on {self.device.type} at\n" + "".join(traceback.format_stack(limit=5)[:-1]))
            return original(self, *args, **kwargs)
        return read

    for name, original in saved.items():
        setattr(torch.Tensor, name, patch(name, original))
    try:
        yield seen
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


@pytest.fixture(scope="module")
def phi_dir(tmp_path_factory, tokenizer):
    """An untrained φ checkpoint of `tiny` (the train_attention scheme only needs one to load)."""
    from trainables.config import ModelConfig
    from trainables.train_attention import PhiConfig, build_phi, save_phi

    d = tmp_path_factory.mktemp("phi")
    cfg = PhiConfig()
    save_phi(d, build_phi(cfg, ModelConfig(name="tiny"), tokenizer, seed=1), cfg, ModelConfig(name="tiny"), tokenizer,
             {})
    return d


STEP_CASES = {
    "uniform": [], "oracle": ["weighting.scheme=oracle"], "known_mask": ["weighting.scheme=known_mask"],
    "rho1": ["weighting.scheme=rho1"],
    "rho1_release": ["weighting.scheme=rho1", "weighting.rho1.selection=release", "weighting.rho1.table_length=64"],
    "random": ["weighting.scheme=random"], "random_uniform": ["weighting.scheme=random", "weighting.random.mode=uniform"],
    "random_match_oracle": ["weighting.scheme=random", "weighting.random.match=oracle"],
    "random_match_rho1": ["weighting.scheme=random", "weighting.random.match=rho1"],
    "train_attention": ["weighting.scheme=train_attention", "weighting.train_attention.phi={phi}"],
    "taalm_known_mask": ["weighting.scheme=train_attention*known_mask", "weighting.train_attention.phi={phi}"],
    "mix_review": ["replay.kind=mix_review", "replay.size=8"],
    "gere": ["replay.kind=gere", "replay.size=8"], "gere_kl": ["replay.kind=gere", "replay.gere.loss=kl", "replay.size=8"],
    "gere_l2": ["replay.kind=gere", "replay.gere.loss=l2", "replay.size=8"],
    "seekr": ["replay.kind=seekr", "replay.size=8", "replay.seekr.head_budget=2"],
    "rho1_mix_review": ["weighting.scheme=rho1", "weighting.rho1.selection=release", "weighting.rho1.table_length=64",
                        "replay.kind=mix_review", "replay.size=8"],
    "recadam": ["regularizer.kind=recadam", "regularizer.recadam.pretrain_coef=100"],
    "ewc": ["regularizer.kind=ewc", "regularizer.ewc.batches=1"],
    "full_rho1": ["params.kind=full", "weighting.scheme=rho1"],
    "kadapter_gere": ["params.kind=kadapter", "params.kadapter.bottleneck=8", "replay.kind=gere", "replay.size=8"],
    "micro_batches": ["train.micro_batch_size=2", "replay.kind=mix_review", "replay.size=8"],
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_a_training_step_runs_on_the_meta_device_without_reading_it(case, tiny_cfg, phi_dir, monkeypatch):
    from trainables.replay import Replay, Seekr

    if case == "seekr":  # its set-up ranks heads on the host, once (not in the step): here two heads, chosen
        monkeypatch.setattr(Seekr, "setup", lambda self, run: (Replay.setup(self, run),
                                                               setattr(self, "heads", [(0, 0), (1, 1)])))
    cfg = tiny_cfg(*[o.format(phi=phi_dir) for o in STEP_CASES[case]]).model_copy(update={"device": "meta"})
    setup = prepare_run(cfg)
    assert all(p.device == META for p in setup.trainable.values())
    optimizer = setup.regularizer.optimizer(list(setup.trainable.values()))
    gen = torch.Generator().manual_seed(0)
    with host_reads() as seen:
        try:
            for step in range(2):
                stats = train_step_stats(setup, optimizer, setup.docs[4 * step:4 * step + 4], gen, replay_round=1,
                                         step=step, micro_batch_size=cfg.train.micro_batch_size)
        except Exception as e:
            pytest.fail(f"{type(e).__name__}: {e}\nhost reads: {seen}")
    assert not seen, "\n".join(seen)
    assert stats.device == META and stats.shape == (4,)


def test_seekr_head_sensitivity_stays_on_the_maps_device():
    from trainables.replay import head_sensitivity

    attn = [torch.empty(2, 3, 5, 5, device=META) for _ in range(2)]
    s = head_sensitivity([torch.empty(2, 3, 5, 5, device=META), None], attn)  # a layer the loss does not reach
    assert s.device == META and s.shape == (2, 3)


def _object_logits(monkeypatch):
    import trainables.metrics as metrics

    seen = []
    original = metrics.strict_argmax_correct

    def spy(logits, targets):
        seen.append(logits.detach().clone())
        return original(logits, targets)

    monkeypatch.setattr(metrics, "strict_argmax_correct", spy)
    return seen


def test_bf16_training_evaluates_epoch_0_exactly_as_fp32(tiny_cfg, monkeypatch):
    seen = _object_logits(monkeypatch)
    out = {}
    for precision in ("fp32", "bf16"):
        seen.clear()
        setup = prepare_run(tiny_cfg(f"train.precision={precision}"))
        out[precision] = evaluate(setup), list(seen)
    (ev32, logits32), (ev16, logits16) = out["fp32"], out["bf16"]
    assert ev16 == ev32
    assert len(logits16) == len(logits32) > 0
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(logits32, logits16))


def test_rho1_excess_loss_is_zero_at_step_0_under_bf16(tiny_cfg, monkeypatch):
    from trainables.weighting import Rho1

    excess = []
    original = Rho1.__call__

    def spy(self, ctx):
        excess.append(float(((ctx.nll - self._reference_nll(ctx)) * ctx.pred_mask).abs().max()))
        return original(self, ctx)

    monkeypatch.setattr(Rho1, "__call__", spy)
    for precision in ("bf16", "fp32"):
        excess.clear()
        setup = prepare_run(tiny_cfg(f"train.precision={precision}", "weighting.scheme=rho1"))
        optimizer = setup.regularizer.optimizer(list(setup.trainable.values()))
        train_step_stats(setup, optimizer, setup.docs[:4], torch.Generator().manual_seed(0), replay_round=1, step=0)
        assert excess == [0.0], precision  # θ before its first update is the reference model, at either precision


def test_an_out_of_memory_error_in_the_vmapped_meta_batch_is_raised(tokenizer):
    from trainables.bilevel import Inner, make_example, meta_gradient
    from trainables.config import ModelConfig, ParamsConfig
    from trainables.data import load_lama
    from trainables.meta import MetaOptions
    from trainables.theta import build_theta
    from trainables.train_attention import PhiConfig, build_phi

    built = build_theta(ModelConfig(name="tiny"), ParamsConfig(kind="lora", r=2), torch.device("cpu"),
                        tokenizer=tokenizer)
    phi = build_phi(PhiConfig(), ModelConfig(name="tiny"), tokenizer, seed=1)
    facts = sorted(load_lama().facts["variant"], key=lambda f: len(f.evidence))[:2]
    examples = [make_example(tokenizer, f, "descriptive", 40, "cpu") for f in facts]

    class Once(Inner):  # the first document loss (inside vmap) runs out of memory; a retry one at a time would not
        calls = 0

        def doc_loss_one(self, *a):
            Once.calls += 1
            if Once.calls == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB (simulated)")
            return super().doc_loss_one(*a)

    inner = Once(built.model, built.trainable, MetaOptions(batching="vmap"), tokenizer.pad_token_id)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        meta_gradient(inner, phi, examples)
    assert inner.batching_off is None and Once.calls == 1


def test_the_gpu_memory_plan_on_made_up_gpus():
    from orchestrator.gpu_plan import CUDA_CONTEXT_GB, gpu_bytes, gpu_fit
    from orchestrator.memory import GB, estimate_trial
    from orchestrator.placement import plan

    # a trial larger than the GPU: one at a time, said (it kept the host memory's concurrency, 2, before)
    f = plan(200 * GB, None, asked=4, workers=1, nodes=[500 * GB], machine=600 * GB, gpu=(1, 141 * GB),
             gpus_per_worker=0.25)
    assert f.fits == 1 and "more than a GPU's 141.0 GB: one at a time" in f.message
    # whole GPUs per worker: the per-GPU need counts too
    f = plan(3 * GB, None, asked=4, workers=1, nodes=[500 * GB], machine=600 * GB, gpu=(2, 16 * GB),
             gpus_per_worker=1, gpu_need_bytes=20 * GB)
    assert f.fits == 1 and "more than a GPU's 16.0 GB" in f.message
    f = plan(3 * GB, None, asked=4, workers=1, nodes=[500 * GB], machine=600 * GB, gpu=(2, 16 * GB),
             gpus_per_worker=1, gpu_need_bytes=10 * GB)
    assert f.fits == 2 and "2 fit on the GPUs" in f.message
    # the CUDA context is counted: trials of 17.3 GB of tensors pack 8 on a 141 GB GPU without it, 7 with it
    assert int(141 // 17.3) == 8 and gpu_fit(gpu_bytes(17.3 * GB, 0, 0), (1, 141 * GB), 0.125, 1)[0] == 7
    assert gpu_bytes(17.3 * GB, 0, 0) == (17.3 + CUDA_CONTEXT_GB) * GB
    # a packed trial larger than its share (its process is capped at the share) says the share it needs
    fits, note = gpu_fit(30 * GB, (1, 141 * GB), 0.125, 1)
    assert fits == 4 and "more than its share's 17.6 GB" in note and "gpus_per_worker >= 0.213" in note
    # more GPUs per worker than there are
    assert gpu_fit(1 * GB, (1, 80 * GB), 2, 1)[0] == 0
    f = plan(3 * GB, None, asked=4, workers=1, nodes=[500 * GB], machine=600 * GB, gpu=(1, 80 * GB), gpus_per_worker=2)
    assert f.fits == 1 and "Ray cannot place a trial" in f.message
    # the estimate's GPU part: θ once (the loading copy and the warm process's kept copy stay on the host) + context
    base = {"model": {"name": "smollm2-135m"}, "train": {"batch_size": 8, "max_length": 256}}
    e = estimate_trial(base)
    host_only = e.parts["weights"] * 2 / 3  # of 3 copies: the file's and the kept one
    assert e.gpu == pytest.approx(e.total - e.parts["runtime"] - host_only + CUDA_CONTEXT_GB * GB)


def test_rays_gpu_as_the_trial_process_numbers_it():
    from orchestrator.gpu_plan import local_cuda, memory_fraction

    assert local_cuda("auto", ["3"], "3") == ("cuda", None)  # a Tune trial: its GPU is its cuda:0
    assert local_cuda("cuda:3", ["3"], "3") == ("cuda:0", None)
    device, note = local_cuda("cuda:1", ["3"], "3")  # passing cuda:1 through would fail: there is one visible GPU
    assert device == "cuda:0" and "Ray assigned GPU 3" in note
    assert local_cuda("cuda", ["3"], "2,3") == ("cuda:1", None)  # a Ray Train worker among the node's workers' GPUs
    assert local_cuda("cuda:2", ["2", "3"], "2,3") == ("cuda:0", None)
    assert memory_fraction(1, 141 * 2 ** 30) is None and memory_fraction(0, 1) is None
    assert memory_fraction(0.25, 141 * 2 ** 30) == pytest.approx(0.25 - 0.5 / 141)


CHILD = """
import sys, time
from pathlib import Path
from trainables.config import load_config
from trainables.continual import continual_update
from trainables.loop import Callback

class Stall(Callback):  # in epoch 2: say so, then wait to be killed
    def on_step(self, unit, step, n_steps, loss):
        if unit == 2:
            Path(sys.argv[2]).write_text("in epoch 2")
            time.sleep(600)

continual_update(load_config(None, sys.argv[3:]), out_dir=sys.argv[1], callbacks=[Stall()])
"""


def test_every_finished_epoch_is_on_disk_when_a_run_is_killed_mid_epoch(tmp_path):
    from conftest import TINY_OVERRIDES

    from trainables.loop import read_epochs

    out, marker = tmp_path / "run", tmp_path / "marker"
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(marker), *TINY_OVERRIDES, "train.epochs=3",
                          "checkpoint.every=0"], cwd=ROOT, start_new_session=True,
                         env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), f"the run did not reach epoch 2 (exit {p.poll()})"
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    records = read_epochs(out / "epochs.jsonl")
    assert [r["index"] for r in records] == [0, 1]  # no metrics.json, no checkpoint: only these
    assert not (out / "metrics.json").exists()
    assert records[1]["train_loss"] > 0 and records[1]["train_tokens"] > 0 and records[1]["steps"] == 2
    assert all(0.0 <= r["to_learn_acc"] <= 1.0 and "eval_seconds" in r for r in records)


def test_a_resumed_run_keeps_the_epochs_before_its_checkpoint(tiny_cfg, tmp_path):
    from trainables.loop import read_epochs

    continual_update(tiny_cfg("train.epochs=2"), out_dir=tmp_path)
    with open(tmp_path / "epochs.jsonl", "a") as f:
        f.write('{"index": 3, "to_le')  # a line cut short by a kill
    assert [r["index"] for r in read_epochs(tmp_path / "epochs.jsonl")] == [0, 1, 2]
    m = continual_update(tiny_cfg("train.epochs=3"), out_dir=tmp_path)  # resumes after epoch 2
    records = read_epochs(tmp_path / "epochs.jsonl")
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert [r["to_learn_acc"] for r in records] == m["to_learn_acc"]
    continual_update(tiny_cfg("train.epochs=1"), out_dir=tmp_path, resume=False)  # a fresh run starts over
    assert [r["index"] for r in read_epochs(tmp_path / "epochs.jsonl")] == [0, 1]


def test_the_out_of_memory_retry_restores_the_steps_generator(tiny_cfg):
    """The first step's second micro-batch runs out of memory after the first micro-batch drew its random weights: the
    step runs again in micro-batches of 1 and must draw what a run in micro-batches of 1 from the start draws."""
    def run(micro, oom_at_second_micro_batch=False):
        setup = prepare_run(tiny_cfg("params.dropout=0.0", "weighting.scheme=random", "train.oom=halve_batch",
                                     f"train.micro_batch_size={micro}"))
        calls = []

        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids")
            if module.training and ids is not None and ids.size(0) == 2:
                calls.append(1)
                if oom_at_second_micro_batch and len(calls) == 2:
                    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        setup.model.register_forward_pre_hook(hook, with_kwargs=True)
        m = continual_update(setup.cfg, setup=setup)
        return m, {k: v.detach().clone() for k, v in setup.trainable.items()}

    halved, ph = run(2, oom_at_second_micro_batch=True)
    explicit, pe = run(1)
    assert [(e["from"], e["to"], e["where"]) for e in halved["oom_events"]] == [(2, 1, "epoch 1, step 0")]
    assert halved["train_loss"] == explicit["train_loss"] and halved["mean_weight"] == explicit["mean_weight"]
    assert all(torch.equal(ph[k], pe[k]) for k in ph)


def test_epoch_statistics_are_read_once_and_a_non_finite_loss_still_fails():
    stats = EpochStats("epoch 3")
    assert stats.add(torch.tensor([2.0, 3.0, 4.0, 10.0], dtype=torch.float64)) == 2.0
    assert stats.add(torch.tensor([1.0, 0.0, 0.0, 5.0], dtype=torch.float64)) == 1.0
    assert stats.finish() == ([2.0, 1.0], [0.75, 0.0], 15)
    with pytest.raises(FloatingPointError, match="non-finite loss nan at epoch 3, step 2"):
        stats.add(torch.tensor([float("nan"), 1, 1, 1], dtype=torch.float64))


def test_recadam_foreach_update_is_the_per_tensor_one():
    from trainables.config import RecAdamOptions
    from trainables.regularizers import RecAdam, anneal_lambda

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    ref = [p.detach().clone() for p in params]
    opts = RecAdamOptions(pretrain_coef=100, t0=2)
    opt = RecAdam(params, lr=1e-3, opts=opts, weight_decay=0.01)
    state = [{"m": torch.zeros_like(r), "v": torch.zeros_like(r), "t": 0, "pre": r.clone()} for r in ref]
    for step in range(4):
        grads = [torch.randn(5, 3) for _ in params]
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (step == 1 and i == 2) else g.clone()  # one tensor without a gradient once
        opt.step()
        for i, (r, g, st) in enumerate(zip(ref, grads, state)):  # the update one tensor at a time
            if step == 1 and i == 2:
                continue
            st["t"] += 1
            t = st["t"]
            st["m"].mul_(0.9).add_(g, alpha=0.1)
            st["v"].mul_(0.999).addcmul_(g, g, value=1 - 0.999)
            adam = (st["m"] / (1 - 0.9 ** t)) / (st["v"] / (1 - 0.999 ** t)).sqrt_().add_(1e-8)
            lam = anneal_lambda(t, opts)
            update = lam * adam + (1 - lam) * opts.pretrain_coef * (r - st["pre"])
            r.mul_(1 - 1e-3 * 0.01)
            r.add_(update, alpha=-1e-3)
    assert all(torch.equal(p.detach(), r) for p, r in zip(params, ref))
    assert [int(opt.state[p]["step"]) for p in params] == [4, 4, 3]

"""TemporalWiki: perplexity against a hand computation, θ carried over between periods, input errors,
and the protocol end to end on the tiny preset with the diff-set fixture."""

import json
import math
from pathlib import Path

import pytest
import torch

from trainables.config import load_config
from trainables.errors import InputError
from trainables.metrics import EncodedProbe
from trainables.temporalwiki import (TemporalWikiConfig, object_perplexity, probe_sentence, resolve_paths,
                                     temporalwiki_run)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "temporalwiki_tiny.yaml"


class ConstLogits(torch.nn.Module):
    """Logits 0 everywhere except `a` on token 3: p(3) = e^a / (e^a + V - 1) at every position."""

    def __init__(self, vocab=8, a=2.0):
        super().__init__()
        self.vocab, self.a = vocab, a

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., 3] = self.a
        return type("O", (), {"logits": logits})()


def test_perplexity_hand_computation():
    V, a = 8, 2.0
    p3 = math.exp(a) / (math.exp(a) + V - 1)
    p_other = 1 / (math.exp(a) + V - 1)
    # probe 1: object tokens [3, 3] at positions 2, 3; probe 2: object token [5] at position 1
    probes = [EncodedProbe([1, 2, 3, 3], [2, 3]), EncodedProbe([1, 5], [1])]
    expected = math.exp((-math.log(p3) * 2 - math.log(p_other)) / 3)
    assert object_perplexity(ConstLogits(V, a), probes, pad_id=0, batch_size=1) == pytest.approx(expected)
    assert object_perplexity(ConstLogits(V, a), probes, pad_id=0, batch_size=8) == pytest.approx(expected)


def test_probe_sentence_format():
    assert probe_sentence("Lyon", "country", "France") == \
        "Guess the object. \n  subject is Lyon , relation is country , object is France"


def _cfg(*overrides):
    return resolve_paths(load_config(EXAMPLE, list(overrides), schema=TemporalWikiConfig), EXAMPLE.parent)


def test_protocol_end_to_end_and_theta_carries_over(tmp_path):
    both = temporalwiki_run(_cfg(), out_dir=tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert [p["period"] for p in on_disk["periods"]] == ["0910", "1011"]
    assert on_disk["avg_changed_ppl"] == pytest.approx(
        (both["periods"][0]["changed_ppl"] + both["periods"][1]["changed_ppl"]) / 2)
    assert all(p["n_changed"] == 16 and p["n_docs"] == 6 for p in both["periods"])
    # the second period alone, from the base model, differs: θ was carried over from the first
    second_only = temporalwiki_run(_cfg('temporalwiki.periods=[{name: "1011", diff: '
                                        f'"{ROOT}/tests/fixtures/temporalwiki/1011.jsonl"}}]'))
    assert second_only["periods"][0]["changed_ppl"] != pytest.approx(both["periods"][1]["changed_ppl"], rel=1e-6)
    # and the first period's model is the second period's starting point: same run, same numbers
    again = temporalwiki_run(_cfg())
    assert again["periods"][1]["changed_ppl"] == pytest.approx(both["periods"][1]["changed_ppl"], rel=1e-9)


def test_interrupted_temporalwiki_resumes_after_its_last_period(tmp_path):
    """Crashed after period 0 was checkpointed and reported, then resumed: period 0 is not redone and every number
    equals a run straight through (θ, its optimizer, the RNG and the results so far are in the checkpoint)."""
    from trainables.loop import Callback

    class Crash(Callback):
        def on_report(self, r):
            assert r.kind == "period"
            if r.index == 0:
                raise KeyboardInterrupt("simulated crash")

    overrides = ("params.kind=lora", "params.r=4", "params.dropout=0.2", "replay.kind=mix_review",
                 f"replay.pool={ROOT}/tests/fixtures/temporalwiki/0910.jsonl")
    full = temporalwiki_run(_cfg(*overrides), out_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        temporalwiki_run(_cfg(*overrides), out_dir=tmp_path / "resumed", callbacks=[Crash()])

    class Seen(Callback):
        info, reports = None, []

        def on_start(self, info):
            Seen.info = info

        def on_report(self, r):
            Seen.reports.append((r.index, r.label))

    resumed = temporalwiki_run(_cfg(*overrides), out_dir=tmp_path / "resumed", callbacks=[Seen()])
    assert Seen.info["resumed_from"] == 0 and Seen.reports == [(1, "1011")]
    assert resumed["periods"] == full["periods"]


def test_every_epoch_of_a_period_replays_its_own_documents():
    """With epochs_per_period > 1 the replayed documents are drawn per (period, epoch) (seeds.period_round): each
    epoch of a period replays its own documents at a given step, not the same ones every epoch; with one epoch
    per period the rounds are the periods, as before."""
    from trainables import seeds
    from trainables.temporalwiki import prepare_temporalwiki

    cfg = _cfg("temporalwiki.epochs_per_period=2", "replay.kind=mix_review",
               f"replay.pool={ROOT}/tests/fixtures/temporalwiki/records.jsonl", "replay.ratio=0.5")
    setup = prepare_temporalwiki(cfg)
    drawn, sample = {}, setup.run.replay.sample

    def spy(n, replay_round, step):
        docs = sample(n, replay_round, step)
        drawn[(replay_round, step)] = [d.input_ids for d in docs]
        return docs

    setup.run.replay.sample = spy
    temporalwiki_run(cfg, setup=setup)
    rounds = sorted({r for r, _ in drawn})
    assert rounds == sorted(seeds.period_round(p, e) for p in range(2) for e in range(2))
    assert [seeds.period_round(p, 0) for p in range(3)] == [0, 1, 2]
    for period in range(2):
        first, second = (drawn[(seeds.period_round(period, e), 0)] for e in range(2))
        assert first != second, period


def test_bad_diff_and_probe_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2"):
        temporalwiki_run(_cfg(f'temporalwiki.periods=[{{name: "0910", diff: "{bad}"}}]'))
    with pytest.raises(InputError, match="no shipped changed probes"):
        temporalwiki_run(_cfg(f'temporalwiki.periods=[{{name: "0708", diff: "{ROOT}/tests/fixtures/temporalwiki/0910.jsonl"}}]'))
    probes = tmp_path / "p.jsonl"
    probes.write_text('{"subject": "A", "relation": "r", "object": ""}\n')
    with pytest.raises(InputError, match=r"p.jsonl:1"):
        temporalwiki_run(_cfg(f'temporalwiki.periods=[{{name: "x", diff: "{ROOT}/tests/fixtures/temporalwiki/0910.jsonl", '
                              f'changed: "{probes}", unchanged: "{probes}"}}]'))
    with pytest.raises(InputError, match="periods"):
        load_config(EXAMPLE, ["temporalwiki.periods=[]"], schema=TemporalWikiConfig)


def test_meta_training_from_records(tmp_path):
    from trainables.meta import MetaConfig, meta_train

    cfg = load_config(ROOT / "examples" / "meta_temporalwiki_tiny.yaml",
                      [f"records={ROOT}/tests/fixtures/temporalwiki/records.jsonl"], schema=MetaConfig)
    m = meta_train(cfg, out_dir=tmp_path)
    assert m["n_train_examples"] == 6 and m["n_val_examples"] == 2
    assert (tmp_path / "phi" / "phi.json").is_file()
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"text": "Lyon is in France.", "subject": "Lyon", "relation": "country", "object": "Spain"}\n')
    with pytest.raises(InputError, match=r"r.jsonl:1"):
        meta_train(load_config(None, [f"records={bad}"], schema=MetaConfig))


@pytest.mark.integration
def test_table2_grid_through_the_orchestrator(ray_local, tmp_path):
    """Finetune, Mix-review, RecAdam, K-Adapter and TAALM (with its records-based meta stage) on the
    fixture, as Ray Train trials under Tune, tracked in MLflow with per-period perplexities."""
    from mlflow.tracking import MlflowClient

    from orchestrator.report_files import write_report
    from orchestrator.ablation import run_ablation

    r = run_ablation(ROOT / "ablations" / "temporalwiki_table2.yaml", out_root=tmp_path)
    assert r["failed"] == 0 and r["trials"] == 5
    c = MlflowClient(r["tracking_uri"])
    exp = c.get_experiment_by_name("temporalwiki_table2")
    trials = c.search_runs([exp.experiment_id], "tags.`taalm.role` = 'trial'")
    assert sorted(t.data.tags["taalm.label"] for t in trials) == ["Finetune", "K-Adapter", "Mix-review",
                                                                 "RecAdam", "TAALM"]
    for t in trials:
        assert [m.step for m in c.get_metric_history(t.info.run_id, "changed_ppl")] == [0, 1]
        assert t.data.metrics["avg_unchanged_ppl"] > 1
    rep = write_report(r["tracking_uri"], r["experiment"], tmp_path / "report")
    assert "CHANGED ppl (avg)" in rep["markdown"] and "| TAALM |" in rep["markdown"]

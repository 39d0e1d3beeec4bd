"""Trial failure isolation: a diverging trial (non-finite loss), a crashing trial (an injected fault) and a
trial over its time budget end as FAILED in MLflow with the reason as a tag, the rest of the study completes,
and the report lists them; with retries configured, a crashed trial is retried from its last checkpoint."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts Ray / MLflow servers

ROOT = Path(__file__).resolve().parents[1]




def _trials(r):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(r["tracking_uri"])
    exp = c.get_experiment_by_name(r["experiment"])
    return {t.data.tags["taalm.label"]: t for t in c.search_runs([exp.experiment_id], "tags.`taalm.role` = 'trial'")}


def test_diverging_and_crashing_trials_fail_alone(ray_local, tmp_path, monkeypatch):
    from orchestrator.report_files import write_report
    from orchestrator.ablation import run_ablation

    monkeypatch.setenv("TAALM_INJECT_FAULT", "1:crashes")
    r = run_ablation(ROOT / "ablations" / "failures_tiny.yaml", out_root=tmp_path)
    assert r["trials"] == 3 and r["failed"] == 2
    trials = _trials(r)
    assert trials["healthy"].info.status == "FINISHED"
    assert trials["diverges"].info.status == "FAILED"
    assert "non-finite loss" in trials["diverges"].data.tags["taalm.failure"]
    assert trials["crashes"].info.status == "FAILED"
    assert "injected fault after epoch 1" in trials["crashes"].data.tags["taalm.failure"]
    assert "taalm.retries" not in trials["crashes"].data.tags  # max_failures 0: no retry
    rep = write_report(r["tracking_uri"], r["experiment"], tmp_path / "report")
    assert "Failed trials (2)" in rep["markdown"]
    for label in ("diverges", "crashes"):
        assert f"{label} seed 0" in rep["markdown"]
        assert f"| {label} |" in rep["markdown"]  # listed with 0 finished seeds and 1 failed, not dropped


def test_crashed_trial_is_retried_from_its_checkpoint(ray_local, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from orchestrator.ablation import run_ablation

    monkeypatch.setenv("TAALM_INJECT_FAULT", "1:Finetune")
    r = run_ablation(ROOT / "ablations" / "smoke_tiny.yaml",
                     ["name=retry", "overrides={train.epochs: 3}", "resources.max_failures=1"], out_root=tmp_path)
    assert r["failed"] == 0
    trials = _trials(r)
    c = MlflowClient(r["tracking_uri"])
    crashed, healthy = trials["Finetune"], trials["Oracle"]
    assert crashed.info.status == "FINISHED" and healthy.info.status == "FINISHED"
    assert crashed.data.tags["taalm.retries"] == "1"
    assert "injected fault after epoch 1" in crashed.data.tags["taalm.retry_reason"]
    # the retry restored the epoch-1 checkpoint instead of starting over ...
    assert crashed.data.tags["taalm.resumed_from_epoch"] == "1"
    assert "taalm.retries" not in healthy.data.tags and "taalm.resumed_from_epoch" not in healthy.data.tags
    # ... and every epoch is in MLflow exactly once, with the final metrics
    for run in (crashed, healthy):
        for name in ("to_learn_acc", "ntf_acc"):
            assert sorted(m.step for m in c.get_metric_history(run.info.run_id, name)) == [0, 1, 2, 3]
        assert "top_acc" in run.data.metrics


def test_time_budget_fails_the_trial(ray_local, tmp_path):
    from orchestrator.ablation import run_ablation

    r = run_ablation(ROOT / "ablations" / "smoke_tiny.yaml",
                     ["name=budget", "resources.time_budget_s=0.001", "axes={weighting.scheme: [uniform]}"],
                     out_root=tmp_path)
    assert r["failed"] == 1
    t = _trials(r)["Finetune"]
    assert t.info.status == "FAILED" and "time budget" in t.data.tags["taalm.failure"]


TW_GRID = ROOT / "ablations" / "temporalwiki_table2.yaml"
TW_ROWS = "zip=[{label: [Finetune, TAALM], weighting.scheme: [uniform, train_attention]}]"


def _runs(r, role):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(r["tracking_uri"])
    exp = c.get_experiment_by_name(r["experiment"])
    return c, {t.data.tags.get("taalm.label", t.info.run_name): t
               for t in c.search_runs([exp.experiment_id], f"tags.`taalm.role` = '{role}'")}


def test_meta_training_and_temporalwiki_trials_are_retried_from_their_checkpoints(ray_local, tmp_path, monkeypatch):
    """Every loop runs through the same trial session: a fault injected into meta-training after its check at step
    2 and into a TemporalWiki trial after period 0 fails each first attempt; with max_failures 1 each is retried
    from the checkpoint of that report (not from scratch), every report logged once, and the study completes."""
    from orchestrator.ablation import run_ablation

    monkeypatch.setenv("TAALM_INJECT_FAULT", "2:meta-train seed 0,0:Finetune")
    r = run_ablation(TW_GRID, ["name=tw_retry", TW_ROWS, "resources.max_failures=1"], out_root=tmp_path,
                     retrain_phi=True)
    assert r["failed"] == 0 and r["trials"] == 2
    c, metas = _runs(r, "meta")
    meta = metas["meta-train seed 0"]
    assert meta.info.status == "FINISHED" and meta.data.tags["taalm.retries"] == "1"
    assert "injected fault after step 2" in meta.data.tags["taalm.retry_reason"]
    assert meta.data.tags["taalm.resumed_from_step"] == "2"
    assert sorted(m.step for m in c.get_metric_history(meta.info.run_id, "val_acc")) == [0, 2, 4]
    _, trials = _runs(r, "trial")
    ft = trials["Finetune"]
    assert ft.info.status == "FINISHED" and ft.data.tags["taalm.retries"] == "1"
    assert "injected fault after period 0" in ft.data.tags["taalm.retry_reason"]
    assert ft.data.tags["taalm.resumed_from_period"] == "0"
    assert sorted(m.step for m in c.get_metric_history(ft.info.run_id, "changed_ppl")) == [0, 1]
    assert trials["TAALM"].info.status == "FINISHED" and "taalm.retries" not in trials["TAALM"].data.tags


def test_time_budget_holds_for_meta_training_and_temporalwiki(ray_local, tmp_path):
    from orchestrator.ablation import run_ablation

    r = run_ablation(TW_GRID, ["name=tw_budget", "zip=[{label: [Finetune], weighting.scheme: [uniform]}]",
                               "resources.time_budget_s=0.001"], out_root=tmp_path)
    assert r["failed"] == 1
    _, trials = _runs(r, "trial")
    assert trials["Finetune"].info.status == "FAILED" and "time budget" in trials["Finetune"].data.tags["taalm.failure"]
    with pytest.raises(RuntimeError, match="meta-training failed.*time budget"):
        run_ablation(TW_GRID, ["name=meta_budget", TW_ROWS, "resources.time_budget_s=0.001"], out_root=tmp_path,
                     retrain_phi=True)
    _, metas = _runs({"tracking_uri": f"sqlite:///{tmp_path / 'meta_budget' / 'mlflow.db'}",
                      "experiment": "meta_budget"}, "meta")
    assert metas["meta-train seed 0"].info.status == "FAILED"
    assert "time budget" in metas["meta-train seed 0"].data.tags["taalm.failure"]

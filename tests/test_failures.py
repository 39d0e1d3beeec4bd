"""Trial failure isolation: a diverging trial (non-finite loss) and a trial over its time budget end as
FAILED in MLflow with the reason as a tag, the rest of the study completes, and the report lists them."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from orchestrator.study import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


def _trials(r):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(r["tracking_uri"])
    exp = c.get_experiment_by_name(r["experiment"])
    return {t.data.tags["taalm.label"]: t for t in c.search_runs([exp.experiment_id], "tags.`taalm.role` = 'trial'")}


def test_diverging_trial_fails_alone(ray_local, tmp_path):
    from orchestrator.report import write_report
    from orchestrator.study import run_ablation

    r = run_ablation(ROOT / "ablations" / "failures_tiny.yaml", out_root=tmp_path)
    assert r["trials"] == 2 and r["failed"] == 1
    trials = _trials(r)
    assert trials["healthy"].info.status == "FINISHED"
    assert trials["diverges"].info.status == "FAILED"
    assert "non-finite loss" in trials["diverges"].data.tags["taalm.failure"]
    rep = write_report(r["tracking_uri"], r["experiment"], tmp_path / "report")
    assert "Failed trials (1)" in rep["markdown"] and "diverges seed 0" in rep["markdown"]
    assert "| diverges |" in rep["markdown"]  # listed with 0 finished seeds and 1 failed, not dropped


def test_time_budget_fails_the_trial(ray_local, tmp_path):
    from orchestrator.study import run_ablation

    r = run_ablation(ROOT / "ablations" / "smoke_tiny.yaml",
                     ["name=budget", "resources.time_budget_s=0.001", "axes={weighting.scheme: [uniform]}"],
                     out_root=tmp_path)
    assert r["failed"] == 1
    t = _trials(r)["Finetune"]
    assert t.info.status == "FAILED" and "time budget" in t.data.tags["taalm.failure"]

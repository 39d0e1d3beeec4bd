"""Search spaces -> Optuna under Ray Tune: distributions, conditionals, an 8-trial study. (Bad specs: tests/test_bad_input.py.)"""

from pathlib import Path

import optuna
import pytest

from orchestrator.search_space import define_by_run, load_search

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "search_spaces" / "tiny_search.yaml"


def test_distributions_and_conditionals():
    spec, base = load_search(TINY)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        t = study.ask()
        define_by_run(spec)(t)
        p = t.params
        assert 1e-4 <= p["train.lr"] <= 1e-2
        assert ("weighting.rho1.k" in p) == (p["weighting.scheme"] == "rho1")
        seen.add(p["weighting.scheme"])
        dist = t.distributions["train.lr"]
        assert dist.log
    assert seen == {"uniform", "oracle", "rho1"}
    spec, _ = load_search(ROOT / "search_spaces" / "smollm2_pareto.yaml")
    assert [o.metric for o in spec.objectives] == ["top_acc", "nf_acc"] and spec.asha is not None


@pytest.mark.integration
def test_optuna_study_of_8_trials_every_trial_in_mlflow_once(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.search import run_search

    r = run_search(TINY, out_root=tmp_path)
    assert r["trials"] == 8 and r["failed"] == 0
    c = MlflowClient(r["tracking_uri"])  # a separate client, reading the store after the study
    exp = c.get_experiment_by_name("tiny_search")
    trials = c.search_runs([exp.experiment_id], "tags.`taalm.role` = 'trial'")
    assert len(trials) == 8
    assert len({t.data.tags["taalm.tune_trial_id"] for t in trials}) == 8
    for t in trials:
        assert t.info.status == "FINISHED"
        steps = [m.step for m in c.get_metric_history(t.info.run_id, "to_learn_acc")]
        assert steps == [0, 1, 2]
        assert "total_knowledge" in t.data.metrics

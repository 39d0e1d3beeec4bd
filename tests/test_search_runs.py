"""What a search claims, run: ASHA stops a trial before its last epoch (Tune records it TERMINATED with its last
iteration below the maximum, MLflow tags it, the report says so), and NSGA-II's report lists as its Pareto front
exactly the trials no other trial dominates in the two objectives. One `taalm tune` of a two-objective search on
the tiny preset (NSGA-II + ASHA, one trial at a time so the order of the trials and ASHA's decisions are fixed).

On `tiny` (a random model) every NOT-TO-FORGET accuracy is 0, so this search's front is the trials of the highest
Top Acc; the front with both objectives in play is checked on hand-made points (test_the_front_is_the_non_dominated_set)."""

import json
from pathlib import Path

import pytest

from orchestrator.report import dominates, pareto_front

ROOT = Path(__file__).resolve().parents[1]

SPACE = """name: pareto_asha_tiny
base: {base}
overrides: {{train.epochs: 2, data.to_learn_size: 8, data.ntf_size: 8}}
num_samples: 4
objectives: [{{metric: top_acc, mode: max}}, {{metric: nf_acc, mode: max}}]
sampler: nsga2
seed: 2
space:
  weighting.scheme: {{type: categorical, choices: [oracle, uniform]}}
  train.lr: {{type: float, low: 0.008, high: 0.012}}
asha: {{grace_period: 1, reduction_factor: 2}}
resources: {{workers: 1, cpus_per_worker: 1, max_concurrent: 1}}
"""


def test_the_front_is_the_non_dominated_set():
    pts = [(0.3, 0.5), (0.2, 0.9), (0.3, 0.5), (0.1, 0.4), (0.35, 0.1), (0.2, 0.8), (0.05, 0.05)]
    assert pareto_front(pts) == [0, 1, 2, 4]  # equal points both stay; the others are dominated
    assert pareto_front(pts, ("max", "min")) == [4, 6]  # y minimised: (0.35, 0.1) dominates all but (0.05, 0.05)
    assert pareto_front([]) == [] and pareto_front([(1.0, 1.0)]) == [0]
    assert dominates((0.3, 0.5), (0.3, 0.4), ("max", "max")) and not dominates((0.3, 0.5), (0.3, 0.5), ("max", "max"))


@pytest.mark.integration
def test_asha_stops_a_trial_early_and_nsga2_reports_its_front(ray_local, tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis

    from orchestrator.report_files import write_report
    from orchestrator.search import run_search
    from orchestrator.search_space import define_by_run, load_search

    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(base=ROOT / "examples" / "run_tiny.yaml"))
    spec, _ = load_search(space)
    # the order NSGA-II's first generation samples in (seed 2): two oracle trials (they learn by epoch 1), then two
    # uniform ones (TO-LEARN 0 at epoch 1, below the oracles' median at ASHA's rung after epoch 1)
    study = optuna.create_study(directions=["maximize"] * 2, sampler=optuna.samplers.NSGAIISampler(seed=spec.seed))
    order = []
    for _ in range(spec.num_samples):
        t = study.ask()
        define_by_run(spec)(t)
        order.append(t.params["weighting.scheme"])
    assert order == ["oracle", "oracle", "uniform", "uniform"], order

    r = run_search(space, out_root=tmp_path)
    assert r["trials"] == 4 and r["failed"] == 0
    c = MlflowClient(r["tracking_uri"])
    exp = c.get_experiment_by_name("pareto_asha_tiny")
    runs = c.search_runs([exp.experiment_id], "tags.`taalm.role` = 'trial'")
    last = {x.data.tags["taalm.tune_trial_id"]: max(m.step for m in c.get_metric_history(x.info.run_id, "to_learn_acc"))
            for x in runs}
    stopped = [x for x in runs if last[x.data.tags["taalm.tune_trial_id"]] < 2]
    assert stopped, last  # ASHA stopped at least one trial before its last epoch
    for x in stopped:
        assert x.info.status == "FINISHED"
        assert x.data.params["weighting.scheme"] == "uniform"
        assert x.data.tags["taalm.stopped_early"] == "by the scheduler (ASHA) after epoch 1 of 2"
    for x in runs:
        if x not in stopped:
            assert "taalm.stopped_early" not in x.data.tags
    # as Tune recorded them: every trial TERMINATED (not errored), the stopped ones at iteration 2 (epochs 0 and 1)
    # of the 3 a whole trial reports
    tune_trials = ExperimentAnalysis(str(Path(r["study_dir"]) / "tune" / "pareto_asha_tiny")).trials
    assert {t.trial_id: t.status for t in tune_trials} == {t: "TERMINATED" for t in last}
    assert {t.trial_id: t.last_result["training_iteration"] for t in tune_trials} == {k: v + 1 for k, v in last.items()}

    rep = write_report(r["tracking_uri"], "pareto_asha_tiny", tmp_path / "report")
    points = {x.info.run_id: (x.data.metrics["top_acc"], x.data.metrics["nf_acc"]) for x in runs}
    non_dominated = {rid for rid, p in points.items() if not any(dominates(q, p, ("max", "max")) for q in points.values())}
    assert {f["run_id"] for f in rep["front"]} == non_dominated
    assert 0 < len(non_dominated) < len(points)  # something was dominated
    md = rep["markdown"]
    assert f"Pareto front of the search (top_acc max, nf_acc max): {len(non_dominated)} of 4 finished trials" in md
    assert f"Stopped early ({len(stopped)} of 4 trials" in md
    for x in stopped:
        assert f"- {x.data.tags['taalm.label']} seed 0: by the scheduler (ASHA) after epoch 1 of 2" in md
    trials = json.loads((tmp_path / "report" / "per_fact.json").read_text())["trials"]
    assert len(trials) == 4

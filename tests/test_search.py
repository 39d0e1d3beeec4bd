"""Search spaces -> Optuna under Ray Tune: distributions, conditionals, bad specs, an 8-trial study."""

from pathlib import Path

import optuna
import pytest

from orchestrator.cli import main
from orchestrator.search import define_by_run, load_search

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


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    return e.value.code, " ".join(capsys.readouterr().err.split())


BASE = "name: s\nbase: BASE\nspace:\n"
BAD = [
    ("low >= high", BASE + "  train.lr: {type: float, low: 0.1, high: 0.01}\n", ["(space.train.lr)", "low < high"]),
    ("log needs positive", BASE + "  train.lr: {type: float, low: 0, high: 0.01, log: true}\n", ["log scale"]),
    ("no choices", BASE + "  weighting.scheme: {type: categorical, choices: []}\n", ["(space.weighting.scheme)"]),
    ("bad type", BASE + "  train.lr: {type: gaussian, low: 1, high: 2}\n", ["(space.train.lr.type)"]),
    ("not a config key", BASE + "  train.learning_rate: {type: float, low: 0.1, high: 0.2}\n",
     ["(space.train.learning_rate)", "unknown key"]),
    ("out of range values", BASE + "  train.lr: {type: float, low: -1.0, high: 0.2}\n",
     ["(space.train.lr)", "greater than 0"]),
    ("unknown scheme", BASE + "  weighting.scheme: {type: categorical, choices: [uniform, nope]}\n",
     ["(space.weighting.scheme)", "nope"]),
    ("conditional on later key", "name: s\nbase: BASE\nspace:\n  weighting.rho1.k: {type: float, low: 0.1, "
     "high: 0.5, when: {weighting.scheme: rho1}}\n  weighting.scheme: {type: categorical, choices: [rho1]}\n",
     ["listed before"]),
    ("three objectives", BASE + "  train.lr: {type: float, low: 0.1, high: 0.2}\nobjectives: [{metric: top_acc}, "
     "{metric: nf_acc}, {metric: ntf_acc}]\n", ["one or two objectives"]),
    ("empty space", "name: s\nbase: BASE\nspace: {}\n", ["at least one parameter"]),
]


@pytest.mark.parametrize("name,text,fragments", BAD, ids=[b[0] for b in BAD])
def test_bad_search_space_exits_2(name, text, fragments, tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text(text.replace("BASE", str(ROOT / "examples" / "run_tiny.yaml")))
    code, err = run_cli(["tune", str(p), "--out", str(tmp_path / "o")], capsys)
    assert code == 2, err
    for f in fragments:
        assert f in err, (f, err)
    assert not (tmp_path / "o").exists()


def test_optuna_study_of_8_trials_every_trial_in_mlflow_once(tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator.search import run_search
    from orchestrator.study import init_ray

    init_ray(None, num_cpus=2)
    try:
        r = run_search(TINY, out_root=tmp_path)
    finally:
        ray.shutdown()
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

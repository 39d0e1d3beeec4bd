"""The orchestrator end to end on `tiny`: a real local Ray cluster, Ray Train workers under Ray Tune,
a real MLflow sqlite store; and data-parallel training on 2 workers matching 1 worker."""

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts Ray / MLflow servers

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "ablations" / "smoke_tiny.yaml"




def _runs(uri, name):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(name)
    return c, c.search_runs([exp.experiment_id])


def test_ablate_end_to_end(ray_local, tmp_path, capsys):
    from orchestrator.cli import main

    with pytest.raises(SystemExit) as e:
        main(["ablate", str(GRID), "--out", str(tmp_path)])
        raise SystemExit(0)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "| Finetune |" in out and "| Oracle |" in out
    study = json.loads((tmp_path / "smoke_tiny" / "study.json").read_text())
    c, runs = _runs(study["tracking_uri"], "smoke_tiny")
    parents = [r for r in runs if r.data.tags.get("taalm.role") == "study"]
    children = [r for r in runs if r.data.tags.get("taalm.role") == "trial"]
    assert len(parents) == 1 and len(children) == 2
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert r.info.status == "FINISHED"
        assert [m.step for m in c.get_metric_history(r.info.run_id, "to_learn_acc")] == [0, 1, 2]
        assert [m.step for m in c.get_metric_history(r.info.run_id, "ntf_acc")] == [0, 1, 2]
        assert {"top_acc", "top_epoch", "nf_acc", "total_knowledge"} <= set(r.data.metrics)
        assert {a.path for a in c.list_artifacts(r.info.run_id)} >= {"config.json", "learning_curve.png",
                                                                      "per_fact.json"}
        assert r.data.params["seed"] == "0" and r.data.tags["taalm.code_version"]
        pf = json.loads(Path(c.download_artifacts(r.info.run_id, "per_fact.json", str(tmp_path))).read_text())
        # every fact's accuracy per epoch, averaging to the logged curve
        assert pf["epochs"] == [0, 1, 2] and len(pf["to_learn_uuids"]) == len(pf["to_learn"][0]) > 0
        logged = [m.value for m in c.get_metric_history(r.info.run_id, "to_learn_acc")]
        assert [sum(v) / len(v) for v in pf["to_learn"]] == pytest.approx(logged)
        assert [sum(v) / len(v) for v in pf["ntf"]] == pytest.approx(
            [m.value for m in c.get_metric_history(r.info.run_id, "ntf_acc")])
    assert len({json.dumps(json.loads(Path(c.download_artifacts(r.info.run_id, "per_fact.json", str(tmp_path / r.info.run_id))
                                          ).read_text())["to_learn_uuids"]) for r in children}) == 1  # same facts
    assert "Paired differences against Finetune" in out and "| Oracle | " in out.split("Paired differences")[1]
    for f in ("table.md", "table.csv", "table.parquet", "paired.csv", "curves.png", "pareto.png"):
        assert (tmp_path / "smoke_tiny" / "report" / f).is_file()


def test_trial_paths_agree(ray_local, tmp_path):
    """One trial's metrics do not depend on how it runs: lean (inside its Tune process, the default for one
    worker; here two trials in turn in one warm process, the second with the kept base weights) equals a Ray
    Train run of one worker exactly, and a Ray Train run of two data-parallel workers up to float summation."""
    from orchestrator.ablation import run_ablation

    curves, pids = {}, {}
    # lean1 runs Oracle, then Finetune in the same warm process with the kept base weights
    for name, workers, lean, schemes in (("lean1", 1, True, "[oracle, uniform]"), ("train1", 1, False, "[uniform]"),
                                         ("train2", 2, False, "[uniform]")):
        r = run_ablation(GRID, [f"name={name}", f"axes={{weighting.scheme: {schemes}}}", f"resources.workers={workers}",
                                f"resources.lean={lean}", "resources.max_concurrent=1",
                                "overrides={train.epochs: 2, train.batch_size: 4}"], out_root=tmp_path)
        assert r["failed"] == 0
        c, runs = _runs(r["tracking_uri"], name)
        for trial in (x for x in runs if x.data.tags.get("taalm.role") == "trial"):
            label = trial.data.tags["taalm.label"]
            curves[name, label] = {k: [m.value for m in c.get_metric_history(trial.info.run_id, k)]
                                   for k in ("train_loss", "to_learn_acc", "ntf_acc", "mean_weight")}
            pids[name, label] = trial.data.tags["taalm.pid"]
    assert pids["lean1", "Finetune"] == pids["lean1", "Oracle"]  # the second trial reused the first one's process
    assert len(curves["lean1", "Finetune"]["train_loss"]) == 2  # epochs 1 and 2 (epoch 0 has no loss)
    assert curves["lean1", "Finetune"] == curves["train1", "Finetune"]
    one, two = curves["train1", "Finetune"], curves["train2", "Finetune"]
    assert one["train_loss"] == pytest.approx(two["train_loss"], rel=1e-4)
    assert one["to_learn_acc"] == two["to_learn_acc"] and one["ntf_acc"] == two["ntf_acc"]

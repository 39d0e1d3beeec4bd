"""Four trials at once on two cores, each logging every epoch; afterwards a separate process counts
every trial's epochs through the MLflow client: nothing lost, nothing duplicated."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COUNT = """
import json, sys
from mlflow.tracking import MlflowClient
c = MlflowClient(sys.argv[1])
exp = c.get_experiment_by_name(sys.argv[2])
out = []
for r in c.search_runs([exp.experiment_id], "tags.`taalm.role` = 'trial'"):
    out.append({"label": r.data.tags["taalm.label"], "seed": r.data.tags["taalm.seed"],
                "status": r.info.status, "start": r.info.start_time, "end": r.info.end_time,
                "steps": {k: [m.step for m in c.get_metric_history(r.info.run_id, k)]
                          for k in ("to_learn_acc", "ntf_acc", "train_loss")}})
print(json.dumps(out))
"""


def test_four_concurrent_trials_lose_and_duplicate_nothing(tmp_path):
    import ray

    from orchestrator.study import init_ray, run_ablation

    init_ray(None, num_cpus=2)
    try:
        r = run_ablation(ROOT / "ablations" / "smoke_tiny.yaml",
                         ["name=concurrent", "seeds=[0,1]", "resources.max_concurrent=4",
                          "resources.cpus_per_worker=0.5", "overrides={train.epochs: 3}"], out_root=tmp_path)
    finally:
        ray.shutdown()
    assert r["trials"] == 4 and r["failed"] == 0
    res = subprocess.run([sys.executable, "-c", COUNT, r["tracking_uri"], "concurrent"], capture_output=True,
                         text=True, timeout=120)
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert sorted((x["label"], x["seed"]) for x in rows) == [("Finetune", "0"), ("Finetune", "1"),
                                                             ("Oracle", "0"), ("Oracle", "1")]
    for x in rows:
        assert x["status"] == "FINISHED"
        assert x["steps"]["to_learn_acc"] == [0, 1, 2, 3] and x["steps"]["ntf_acc"] == [0, 1, 2, 3]
        assert x["steps"]["train_loss"] == [1, 2, 3]
    # they really ran at the same time: every trial started before the first one ended
    assert max(x["start"] for x in rows) < min(x["end"] for x in rows)

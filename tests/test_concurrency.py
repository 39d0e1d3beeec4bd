"""Four trials at once on two cores, each logging every epoch; and two studies (two `taalm ablate`
processes, each its own Tune driver, attached to the session's local Ray instance) writing into one tracking
store at the same time, a sqlite file and a `taalm ui` server. Afterwards a separate process counts every trial's epochs through the
MLflow client: nothing lost, nothing duplicated."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port_number

pytestmark = pytest.mark.integration  # starts Ray / MLflow servers

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
                          for k in ("to_learn_acc", "ntf_acc", "train_loss")},
                "metrics": sorted(r.data.metrics),
                "artifacts": sorted(a.path for a in c.list_artifacts(r.info.run_id))})
print(json.dumps(out))
"""


def test_four_concurrent_trials_lose_and_duplicate_nothing(ray_local, tmp_path):
    from orchestrator.ablation import run_ablation

    r = run_ablation(ROOT / "ablations" / "smoke_tiny.yaml",
                     ["name=concurrent", "seeds=[0,1]", "resources.max_concurrent=4",
                      "resources.cpus_per_worker=0.5", "overrides={train.epochs: 3}"], out_root=tmp_path)
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


TAALM = str(Path(sys.executable).with_name("taalm"))

OPEN_STUDY = """
import sys, time
from pathlib import Path
from orchestrator.mlflow_store import Study
db, name, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(db.parent / name).mkdir()
(db.parent / f"{name}.ready").touch()
deadline = time.time() + 300
while len(list(db.parent.glob("*.ready"))) < n and time.time() < deadline:  # all imported: go together
    time.sleep(0.002)
Study(f"sqlite:///{db}", name, db.parent / name)
"""


def test_studies_opening_a_new_sqlite_store_at_once(tmp_path):
    """Four studies created at the same instant in one new sqlite file (MLflow alone races on creating the
    schema there: "Online migration expected to match one row"): all four get their experiment and study run."""
    db = tmp_path / "new.db"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STUDY, str(db), f"s{i}", "4"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(4)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(o[-3000:] for o in outs)
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{db}")
    for i in range(4):
        exp = c.get_experiment_by_name(f"s{i}")
        assert exp is not None
        assert len(c.search_runs([exp.experiment_id], "tags.`taalm.role` = 'study'")) == 1


def _count(uri: str, experiment: str) -> list[dict]:
    res = subprocess.run([sys.executable, "-c", COUNT, uri, experiment], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])




def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process (`taalm ui` forwards it to its server, which runs in a session of its own), then
    SIGKILL to its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def test_two_studies_into_one_store_at_once_lose_nothing(ray_head, tmp_path):
    """Two `taalm ablate` at once into one sqlite file, and two at once into a `taalm ui` server given as
    --tracking-uri (all four running together: four driver processes attached to the session's local Ray
    instance, each trial on half of one of its 2 CPUs; one trial of two epochs each, the cheapest study); every
    trial has all its epochs, its summary and its artifacts, once."""
    store = tmp_path / "server_store"  # what `taalm ui` serves: a study directory naming a sqlite store
    store.mkdir()
    record = {"kind": "grid", "name": "server_store", "tracking_uri": f"sqlite:///{store / 'mlflow.db'}"}
    (store / "study.json").write_text(json.dumps(record))
    port = free_port_number()
    server_uri = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen([TAALM, "ui", str(store), "--port", str(port)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    studies = {}  # name -> (tracking URI, process, log)
    try:
        deadline = time.time() + 300  # a new store: `taalm ui` creates its schema first
        while True:
            try:
                urllib.request.urlopen(server_uri + "/health", timeout=5)
                break
            except OSError:
                assert time.time() < deadline and ui.poll() is None, "`taalm ui` did not come up"
                time.sleep(1)
        shared_file = f"sqlite:///{tmp_path / 'shared.db'}"
        for name, uri in (("file_a", shared_file), ("file_b", shared_file), ("server_a", server_uri),
                          ("server_b", server_uri)):
            log = open(tmp_path / f"{name}.log", "w")
            proc = subprocess.Popen(
                [TAALM, "ablate", str(ROOT / "ablations" / "smoke_tiny.yaml"), "--out", str(tmp_path),
                 "--tracking-uri", uri, "--set", f"name={name}", "--set", "resources.cpus_per_worker=0.5",
                 "--set", "resources.max_concurrent=1", "--set", "axes={weighting.scheme: [oracle]}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            studies[name] = (uri, proc, log)
        for name, (_, proc, _) in studies.items():
            code = proc.wait(timeout=900)
            assert code == 0, f"{name}: exit {code}\n" + (tmp_path / f"{name}.log").read_text()[-6000:]
            # the piped console: our lines with counts out of the study's trials, none of Ray's / Tune's chatter
            console = (tmp_path / f"{name}.log").read_text()
            for line in (f"{name}: trials: 1 trial(s), 1 at a time", "  Oracle seed 0 epoch 2/2: TO-LEARN ",
                         "trial done: Oracle seed 0 (1/1 done, ",
                         f"{name}: Ray: attached to the local Ray instance at {ray_head['address']}"):
                assert line in console, (line, console[-3000:])
            for noise in ("TensorBoard", "Configuration for experiment", "View detailed results",
                          "Started a local Ray instance", "Trial status"):
                assert noise not in console, (noise, console[-3000:])
            assert (tmp_path / name / "logs" / "study.log").stat().st_size > 0
        for pair in (("file_a", "file_b"), ("server_a", "server_b")):
            spans = []
            for name in pair:
                rows = _count(studies[name][0], name)
                assert sorted((x["label"], x["seed"]) for x in rows) == [("Oracle", "0")], name
                for x in rows:
                    assert x["status"] == "FINISHED", (name, x)
                    assert x["steps"]["to_learn_acc"] == [0, 1, 2] and x["steps"]["ntf_acc"] == [0, 1, 2], (name, x)
                    assert x["steps"]["train_loss"] == [1, 2], (name, x)
                    assert {"top_acc", "top_epoch", "nf_acc", "total_knowledge"} <= set(x["metrics"]), (name, x)
                    assert {"config.json", "curves.json", "per_fact.json"} <= set(x["artifacts"]), (name, x)
                spans.append((min(x["start"] for x in rows), max(x["end"] for x in rows)))
            # the two studies' trials were writing to the store at the same time
            assert max(s for s, _ in spans) < min(e for _, e in spans), (pair, spans)
    finally:
        for _, proc, log in studies.values():
            _stop(proc)
            log.close()
        _stop(ui)

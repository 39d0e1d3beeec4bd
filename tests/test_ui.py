"""`taalm ui` serves the study's MLflow store on 127.0.0.1: its console shows where the study opens, the server's
own output (uvicorn's request log) goes to the study's log; a SIGTERM stops it cleanly. A study tracked on a
remote MLflow server (an http tracking URI) gets its saved view through the REST API, and `taalm ui` on it
points at that server instead of starting one."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port_number

pytestmark = pytest.mark.integration  # starts Ray / MLflow servers


def stop_ui(proc) -> None:
    """Stop a `taalm ui` process and the MLflow server it started, whatever state a test left them in: a SIGTERM
    to `taalm ui` (it forwards it to the server, which runs in a session of its own), then SIGKILL to anything
    of theirs still alive."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the server's own session (its uvicorn worker with it)
        except (ProcessLookupError, PermissionError):
            p.kill()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _answer(port: int, name: str = "ui_study", deadline_s: float = 300):  # a loaded machine starts mlflow slowly
    body, deadline = None, time.time() + deadline_s
    while time.time() < deadline and body is None:
        try:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}")
            body = json.loads(urllib.request.urlopen(req, timeout=5).read())
        except OSError:
            time.sleep(1)
    assert body is not None, f"the MLflow server did not answer within {deadline_s} s"
    return body


def test_ui_serves_the_study_on_loopback_and_stops_cleanly_on_sigterm(tmp_path):
    """`taalm ui` serves the study on 127.0.0.1, in the training view, and prints its links (only those: the server's
    request log goes to <study>/logs/study.log); a SIGTERM to `taalm ui` alone (what a process manager sends)
    stops the MLflow server and its workers: no process left, the port free. Meanwhile a second study, tracked
    through that server's REST API (--tracking-uri http://...), gets its trials view and its durations there."""
    import psutil
    from mlflow.tracking import MlflowClient

    from orchestrator.mlflow_views import VIEW_TAG_PREFIX, TRIALS_VIEW
    from orchestrator.mlflow_store import RUNNING_TAG, Study, default_tracking_uri
    from orchestrator.tracking import MlflowTrials

    study_dir = tmp_path / "s"
    study_dir.mkdir()
    uri = default_tracking_uri(study_dir)
    Study(uri, "ui_study", study_dir).finish()
    (study_dir / "study.json").write_text(json.dumps({"tracking_uri": uri, "name": "ui_study", "kind": "grid"}))
    port = free_port_number()
    exe = Path(sys.executable).with_name("taalm")
    console = tmp_path / "console.txt"
    with open(console, "w") as out:
        proc = subprocess.Popen([str(exe), "ui", str(study_dir), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        body = _answer(port)
        assert body["experiment"]["name"] == "ui_study"
        tags = {t["key"]: t["value"] for t in body["experiment"].get("tags", [])}
        assert tags.get("mlflow.experimentKind") == "custom_model_development"  # opens in the training view
        assert VIEW_TAG_PREFIX + TRIALS_VIEW in tags  # a study from before views gets one from `taalm ui`

        # a study tracked on this server over REST (its store is the first study's: any MLflow server would do)
        remote = f"http://127.0.0.1:{port}"
        rdir = tmp_path / "r"
        rstudy = Study(remote, "remote_study", rdir)
        assert rstudy.save_trials_view(["weighting.scheme", "seed"]) == TRIALS_VIEW
        info = {"k": {"run_name": "Oracle seed 0", "role": "trial", "params": {"weighting.scheme": "oracle"},
                      "config": {}, "tags": {}}}
        trial = type("T", (), {"config": {"t": {"trial_key": "k"}}, "trial_id": "t0", "last_result": {},
                               "error_file": None})()
        cb = MlflowTrials(rstudy, info)
        cb.on_trial_start(0, [], trial)
        cb.on_trial_result(0, [], trial, {"kind": "epoch", "index": 0, "to_learn_acc": 0.25})
        cb.on_trial_complete(0, [], trial)
        rstudy.finish()
        c = MlflowClient(remote)
        exp = c.get_experiment_by_name("remote_study")
        state = json.loads(json.loads(exp.tags[VIEW_TAG_PREFIX + TRIALS_VIEW])["state"])
        assert "params.`weighting.scheme`" in state["selectedColumns"]
        run = c.get_run(cb.run_ids["k"])
        assert run.info.status == "FINISHED"
        assert abs(run.info.end_time - run.info.start_time - float(run.data.tags[RUNNING_TAG]) * 1000) <= 50
        (rdir / "study.json").write_text(json.dumps({"tracking_uri": remote, "name": "remote_study", "kind": "grid"}))
        r = subprocess.run([str(exe), "ui", str(rdir)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"{remote}/#/experiments/{exp.experiment_id}/runs?viewStateShareKey={TRIALS_VIEW}" in r.stderr
        assert f"{remote}/#/compare-runs?runs=" in r.stderr and f"tracked on the MLflow server {remote}" in r.stderr

        tree = psutil.Process(proc.pid).children(recursive=True)
        assert tree, "the server runs as a child of `taalm ui`"
        proc.send_signal(signal.SIGTERM)  # to taalm ui only, not its group
        assert proc.wait(timeout=60) == 0
        gone, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
        with socket.socket() as s:
            # the port is free again: nothing listens on it. SO_REUSEADDR as any server sets it: the connections
            # this test made may sit in TIME_WAIT on the port, which blocks a plain bind but not a new server
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
        # the console: our lines only; the server's start-up and request log are in the study's log
        lines = console.read_text().splitlines()
        assert len(lines) == 2, lines
        assert lines[0].startswith(f"MLflow UI on http://127.0.0.1:{port} for {uri}")
        assert re.fullmatch(rf"Study ui_study: http://127\.0\.0\.1:{port}/#/experiments/\d+/runs\?"
                            rf"viewStateShareKey={TRIALS_VIEW}&workflowType=machine_learning", lines[1])
        server_log = (study_dir / "logs" / "study.log").read_text()
        assert "Uvicorn running on" in server_log and '"GET /api/2.0/mlflow/experiments/get-by-name' in server_log
    finally:
        stop_ui(proc)  # also when an assertion failed before the SIGTERM above

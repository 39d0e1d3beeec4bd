"""`taalm ui` serves the study's MLflow store on 127.0.0.1."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port_number

pytestmark = pytest.mark.integration  # starts Ray / MLflow servers




def _answer(port: int, deadline_s: float = 300):  # a loaded machine starts mlflow server slowly
    body, deadline = None, time.time() + deadline_s
    while time.time() < deadline and body is None:
        try:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui_study")
            body = json.loads(urllib.request.urlopen(req, timeout=5).read())
        except OSError:
            time.sleep(1)
    assert body is not None, f"the MLflow server did not answer within {deadline_s} s"
    return body


def test_ui_serves_the_study_on_loopback_and_stops_cleanly_on_sigterm(tmp_path):
    """`taalm ui` serves the study on 127.0.0.1, in the training view; a SIGTERM to `taalm ui` alone (what a
    process manager sends) stops the MLflow server and its workers: no process left, the port free."""
    import psutil

    from orchestrator.tracking import Study, default_tracking_uri

    study_dir = tmp_path / "s"
    study_dir.mkdir()
    uri = default_tracking_uri(study_dir)
    Study(uri, "ui_study", study_dir).finish()
    (study_dir / "study.json").write_text(json.dumps({"tracking_uri": uri, "name": "ui_study", "kind": "grid"}))
    port = free_port_number()
    exe = Path(sys.executable).with_name("taalm")
    proc = subprocess.Popen([str(exe), "ui", str(study_dir), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        body = _answer(port)
        assert body["experiment"]["name"] == "ui_study"
        tags = {t["key"]: t["value"] for t in body["experiment"].get("tags", [])}
        assert tags.get("mlflow.experimentKind") == "custom_model_development"  # opens in the training view
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert tree, "the server runs as a child of `taalm ui`"
        proc.send_signal(__import__("signal").SIGTERM)  # to taalm ui only, not its group
        assert proc.wait(timeout=60) == 0
        gone, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
        with socket.socket() as s:
            # the port is free again: nothing listens on it. SO_REUSEADDR as any server sets it: the connections
            # this test made may sit in TIME_WAIT on the port, which blocks a plain bind but not a new server
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        import os
        import signal

        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

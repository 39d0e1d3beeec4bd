"""`taalm ui` serves the study's MLflow store on 127.0.0.1."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_study_on_loopback(tmp_path):
    from orchestrator.tracking import Study, default_tracking_uri

    study_dir = tmp_path / "s"
    study_dir.mkdir()
    uri = default_tracking_uri(study_dir)
    Study(uri, "ui_study", study_dir).finish()
    (study_dir / "study.json").write_text(json.dumps({"tracking_uri": uri, "name": "ui_study", "kind": "grid"}))
    port = _free_port()
    exe = Path(sys.executable).with_name("taalm")
    proc = subprocess.Popen([str(exe), "ui", str(study_dir), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        body = None
        deadline = time.time() + 90
        while time.time() < deadline and body is None:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui_study")
                body = json.loads(urllib.request.urlopen(req, timeout=5).read())
            except OSError:
                time.sleep(1)
        assert body is not None, "the MLflow server did not answer within 90 s"
        assert body["experiment"]["name"] == "ui_study"
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

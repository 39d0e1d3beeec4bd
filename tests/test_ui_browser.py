"""`taalm ui` serves the study on 127.0.0.1; headless Chromium (Debian's package, installed by
`make test`) renders the experiment page and each trial run's page with its name and metrics."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1600,1200", "--virtual-time-budget=30000", "--dump-dom"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dom(url: str, profile: Path) -> str:
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", url], capture_output=True, text=True,
                       timeout=120)
    assert r.stdout, f"chromium printed no DOM (exit {r.returncode}): {r.stderr[-1500:]}"
    return r.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
def test_experiment_and_trial_pages_in_headless_chromium(tmp_path):
    from orchestrator.tracking import Study, default_tracking_uri

    study_dir = tmp_path / "s"
    study_dir.mkdir()
    uri = default_tracking_uri(study_dir)
    study = Study(uri, "browser_study", study_dir)
    runs = {}
    for label in ("Finetune", "Oracle"):
        rid = study.child(f"key-{label}", f"{label} seed 0", "trial", {"label": label}, {"taalm.label": label})
        for epoch, acc in enumerate((0.0, 0.25)):
            study.client.log_metric(rid, "to_learn_acc", acc, step=epoch)
        study.client.set_terminated(rid)
        runs[label] = rid
    study.finish()
    (study_dir / "study.json").write_text(json.dumps({"tracking_uri": uri, "name": "browser_study", "kind": "grid"}))

    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("taalm")), "ui", str(study_dir), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, up = time.time() + 120, False
        while time.time() < deadline and not up and proc.poll() is None:
            try:
                up = urllib.request.urlopen(base + "/", timeout=5).status == 200
            except OSError:
                time.sleep(1)
        assert up, f"the MLflow server did not come up: {(tmp_path / 'server.log').read_text()[-1500:]}"
        exp = study.experiment_id
        page = _dom(f"{base}/#/experiments/{exp}/runs", tmp_path / "p0")
        assert "browser_study" in page  # the experiment and its parent (study) run
        for label, rid in runs.items():
            page = _dom(f"{base}/#/experiments/{exp}/runs/{rid}", tmp_path / f"p-{label}")
            assert f"{label} seed 0" in page and "to_learn_acc" in page and "taalm.role" in page
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

"""`taalm ui` serves the study on 127.0.0.1; headless Chromium (Debian's package, installed by
`make test`) renders the page `taalm ui` prints (the study's runs in the Model-training view, every trial
listed without expanding the study run), each trial run's page with its name and metrics, and the study
run's page with the report table as its description. A screenshot of the study's runs page is left at
$TAALM_UI_SCREENSHOT (default: study_runs.png in the test's tmp directory,
/tmp/pytest-of-$USER/pytest-current/test_experiment_and_trial_pagecurrent/). At the end `taalm ui` gets a
SIGTERM: no process of it is left and the port is free."""

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port_number

pytestmark = pytest.mark.integration  # starts Ray / MLflow servers

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1600,1000", "--virtual-time-budget=30000"]




def _chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, *extra, f"--user-data-dir={profile}", url], capture_output=True,
                          text=True, timeout=300)


def _dom(url: str, profile: Path) -> str:
    r = _chromium(url, profile, "--dump-dom")
    assert r.stdout, f"chromium printed no DOM (exit {r.returncode}): {r.stderr[-1500:]}"
    return r.stdout


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
def test_experiment_and_trial_pages_in_headless_chromium(tmp_path):
    import psutil

    from orchestrator.report import write_report
    from orchestrator.tracking import Study, default_tracking_uri

    study_dir = tmp_path / "s"
    study_dir.mkdir()
    uri = default_tracking_uri(study_dir)
    study = Study(uri, "browser_study", study_dir)
    runs = {}
    for label, top in (("Finetune", 0.25), ("Oracle", 0.5)):
        rid = study.child(f"key-{label}", f"{label} seed 0", "trial", {"label": label},
                          {"taalm.label": label, "taalm.seed": 0})
        for epoch, acc in enumerate((0.0, top)):
            study.client.log_metric(rid, "to_learn_acc", acc, step=epoch)
            study.client.log_metric(rid, "ntf_acc", 1.0, step=epoch)
        for k, v in (("top_acc", top), ("top_epoch", 1), ("nf_acc", 1.0), ("total_knowledge", top + 1.0)):
            study.client.log_metric(rid, k, v)
        study.client.set_terminated(rid)
        runs[label] = rid
    study.finish()
    (study_dir / "study.json").write_text(json.dumps({"tracking_uri": uri, "name": "browser_study", "kind": "grid"}))
    write_report(uri, "browser_study", study_dir / "report")  # the table goes onto the study run too
    assert "report/table.md" in {a.path for a in study.client.list_artifacts(study.parent_id, "report")}
    assert "| Oracle" in study.client.get_run(study.parent_id).data.tags["mlflow.note.content"]

    port = free_port_number()
    log_path = tmp_path / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("taalm")), "ui", str(study_dir), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, up = time.time() + 300, False  # a loaded machine starts mlflow server slowly
        while time.time() < deadline and not up and proc.poll() is None:
            try:
                up = urllib.request.urlopen(base + "/", timeout=5).status == 200
            except OSError:
                time.sleep(1)
        assert up, f"the MLflow server did not come up: {log_path.read_text()[-1500:]}"
        exp = study.experiment_id
        printed = re.findall(r"Study browser_study: (http://\S+)", log_path.read_text())
        assert printed and printed[0].startswith(f"{base}/#/experiments/{exp}/runs?"), log_path.read_text()
        study_url = printed[0]

        # the printed page: Model-training view, both trials listed without expanding the study run
        page = _dom(study_url, tmp_path / "p0")
        assert "browser_study" in page and "Model registry" in page  # the training view's sidebar
        for label in runs:
            assert f"{label} seed 0" in page, f"trial {label} not listed on {study_url}"
        shot = Path(os.environ.get("TAALM_UI_SCREENSHOT") or tmp_path / "study_runs.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        r = _chromium(study_url, tmp_path / "p1", f"--screenshot={shot}")
        assert shot.is_file(), f"no screenshot (exit {r.returncode}): {r.stderr[-1500:]}"
        assert _png_size(shot) == (1600, 1000)

        for label, rid in runs.items():
            page = _dom(f"{base}/#/experiments/{exp}/runs/{rid}", tmp_path / f"p-{label}")
            assert f"{label} seed 0" in page and "to_learn_acc" in page and "taalm.role" in page
        # the study run's page: the report table as its description
        page = _dom(f"{base}/#/experiments/{exp}/runs/{study.parent_id}", tmp_path / "p-study")
        assert "Top Acc" in page and "Total Knowledge" in page and "Oracle" in page

        # SIGTERM to `taalm ui` alone (what a process manager sends): the server and its workers end too
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert tree, "the server runs as a child of `taalm ui`"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # the port is free again
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        log.close()

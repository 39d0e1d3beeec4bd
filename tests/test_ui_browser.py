"""A real study (`taalm ablate` of the smoke grid: two trials on the tiny preset), `taalm ui` on it, and the
pages it prints loaded in headless Chromium (Debian's package, installed by `make test`) without a click:

* the study's trials view: the trial rows only, best Top Acc first, and every trial's Top Acc, Epoch, NF Acc,
  Total Knowledge and weighting scheme in the cells MLflow renders (read from the DOM by row = run id and
  column = metric); the same page without the view (MLflow's default columns) shows none of these numbers;
* MLflow's compare page of the trials: every trial's Top Acc and Total Knowledge in its Metrics table, as
  MLflow formats them, in the Model-training mode;
* each trial run's page (its name, metrics, tags) and the study run's page (the report table as its
  description, linking the view).

A screenshot of the trials view is left at $TAALM_UI_SCREENSHOT (default: study_runs.png in the test's tmp
directory, /tmp/pytest-of-$USER/pytest-current/test_the_printed_pages_showcurrent/). At the end `taalm ui` gets a
SIGTERM: no process of it is left and the port is free. The DOM is read as MLflow 3.17's UI builds it (AG Grid's
row-id / col-id attributes; the compare page's react-virtualized grids), the version constraints.txt pins."""

import json
import math
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
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from conftest import free_port_number
from test_ui import stop_ui

pytestmark = pytest.mark.integration  # starts Ray / MLflow servers

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "ablations" / "smoke_tiny.yaml"
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


def js_number(x: float) -> str:
    """A number as JavaScript prints it (String(x)), which is how MLflow's runs table shows a metric."""
    if x == int(x) and abs(x) < 1e21:
        return str(int(x))
    r = repr(x)
    return format(Decimal(r), "f") if "e" in r and abs(x) >= 1e-6 else r


def format_metric(x: float) -> str:
    """MLflow's Utils.formatMetric (the compare page's Metrics table): 3 decimals below 10, 2 below 100, else 1;
    JavaScript's Math.round rounds halves up."""
    if x == 0:
        return "0"
    if abs(x) < 1e-3:
        mantissa, exp = f"{x:.3e}".split("e")
        return f"{mantissa}e{int(exp):+d}"
    scale = 1000 if abs(x) < 10 else 100 if abs(x) < 100 else 10
    return js_number(math.floor(x * scale + 0.5) / scale)


class RunsGrid(HTMLParser):
    """The runs table's cells: {run id: {column id: text}} (AG Grid's row-id and col-id attributes)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, html: str):
        super().__init__()
        self.depth, self.row, self.cell, self.text, self.cells, self.order = 0, None, None, [], {}, []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        self.depth += 1
        a = dict(attrs)
        if a.get("role") == "row" and a.get("row-id"):
            self.row = (a["row-id"], self.depth)
            if a["row-id"] not in self.order:
                self.order.append(a["row-id"])  # rows in the order the grid lays them out
        elif self.row and a.get("role") == "gridcell" and a.get("col-id"):
            self.cell, self.text = (a["col-id"], self.depth), []

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if self.cell and self.cell[1] == self.depth:
            self.cells.setdefault(self.row[0], {})[self.cell[0]] = "".join(self.text).strip()
            self.cell = None
        if self.row and self.row[1] == self.depth:
            self.row = None
        self.depth -= 1

    def handle_data(self, data):
        if self.cell:
            self.text.append(data)


def compare_metrics(page: str) -> dict[str, dict[int, str]]:
    """The compare page's Metrics table: {metric: {run column: text}} (two react-virtualized grids: the names at
    top = row x 45 px, the values at (top, left = column x width))."""
    start = page.index('aria-label="Metrics - Show diff only"')
    end = page.index("collapse Artifacts", start)
    seg = page[start:end]
    names = {int(top): name for top, name in re.findall(r'top: (\d+)px; width: \d+px;"><a [^>]*>([^<]+)<', seg)}
    values: dict[str, dict[int, str]] = {}
    for left, top, width, text in re.findall(
            r'left: (\d+)px; position: absolute; top: (\d+)px; width: (\d+)px;"><span[^>]*>([^<]*)</span>', seg):
        values.setdefault(names[int(top)], {})[int(left) // int(width)] = text
    return values


def test_the_printed_pages_show_the_numbers_without_a_click(tmp_path):
    if CHROMIUM is None:
        from needs import missing

        missing("Debian's chromium is not installed (make test installs it: apt-get install chromium)")
    import psutil
    from mlflow.tracking import MlflowClient

    exe = str(Path(sys.executable).with_name("taalm"))
    r = subprocess.run([exe, "ablate", str(GRID), "--out", str(tmp_path), "--num-cpus", "2", "--set",
                        "name=browser_study"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    study_dir = tmp_path / "browser_study"
    client = MlflowClient(json.loads((study_dir / "study.json").read_text())["tracking_uri"])
    exp = client.get_experiment_by_name("browser_study").experiment_id
    runs = client.search_runs([exp])
    trials = {x.info.run_id: x for x in runs if x.data.tags.get("taalm.role") == "trial"}
    study_run = next(x for x in runs if x.data.tags.get("taalm.role") == "study")
    assert sorted(t.data.tags["taalm.label"] for t in trials.values()) == ["Finetune", "Oracle"]

    port = free_port_number()
    log_path = tmp_path / "console.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([exe, "ui", str(study_dir), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, up = time.time() + 300, False  # a loaded machine starts mlflow server slowly
        while time.time() < deadline and not up and proc.poll() is None:
            try:
                up = urllib.request.urlopen(base + "/", timeout=5).status == 200
            except OSError:
                time.sleep(1)
        printed = log_path.read_text()
        assert up, f"the MLflow server did not come up: {printed[-1500:]}"
        view = re.findall(r"^Study browser_study: (http://\S+)$", printed, flags=re.M)
        compare = re.findall(r"^Compare browser_study \(2 trials\): (http://\S+)$", printed, flags=re.M)
        assert view and view[0].startswith(f"{base}/#/experiments/{exp}/runs?"), printed
        assert compare and compare[0].startswith(f"{base}/#/compare-runs?"), printed

        # the printed page: the trial rows only (not the study run), best Top Acc first, their numbers in view
        page = _dom(view[0], tmp_path / "p0")
        assert "browser_study" in page and "Model registry" in page  # the Model-training view's sidebar
        grid = RunsGrid(page)
        assert set(grid.order) == set(trials), f"rows {grid.order}, trials {list(trials)}"
        tops = [trials[rid].data.metrics["top_acc"] for rid in grid.order]
        assert tops == sorted(tops, reverse=True)
        for rid, t in trials.items():
            cells, m = grid.cells[rid], t.data.metrics
            for name in ("top_acc", "top_epoch", "nf_acc", "total_knowledge"):
                assert cells.get(f"metrics.`{name}`") == js_number(m[name]), (t.info.run_name, name, cells)
            assert cells.get("params.`weighting.scheme`") == t.data.params["weighting.scheme"], cells
            assert t.info.run_name in cells.get("attributes.`Run Name`", "")
        # the same runs page without the view (MLflow's default columns; the page `taalm ui` printed before, sorted
        # by Top Acc so that the trials are listed flat): the trials are there, their numbers are not
        plain = RunsGrid(_dom(f"{base}/#/experiments/{exp}/runs?workflowType=machine_learning&orderByKey="
                              f"metrics.%60top_acc%60&orderByAsc=false", tmp_path / "p1"))
        assert set(trials) <= set(plain.order)
        assert not [c for rid in trials for c in plain.cells[rid] if c.startswith(("metrics.", "params."))]

        shot = Path(os.environ.get("TAALM_UI_SCREENSHOT") or tmp_path / "study_runs.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        r = _chromium(view[0], tmp_path / "p2", f"--screenshot={shot}")
        assert shot.is_file(), f"no screenshot (exit {r.returncode}): {r.stderr[-1500:]}"
        assert _png_size(shot) == (1600, 1000)

        # MLflow's compare page of the trials, one column per trial in the link's order, best Top Acc first
        order = json.loads(unquote(re.search(r"runs=([^&]+)", compare[0]).group(1)))
        assert sorted(order) == sorted(trials)
        assert [trials[rid].data.metrics["top_acc"] for rid in order] == sorted(tops, reverse=True)
        page = _dom(compare[0], tmp_path / "p3")
        assert "Comparing 2 Runs from 1 Experiment" in page and "Model registry" in page  # Model-training mode
        shown = compare_metrics(page)
        for i, rid in enumerate(order):
            for name in ("top_acc", "total_knowledge"):
                assert shown[name].get(i) == format_metric(trials[rid].data.metrics[name]), (name, i, shown[name])

        for rid, t in trials.items():
            page = _dom(f"{base}/#/experiments/{exp}/runs/{rid}", tmp_path / f"p-{rid}")
            assert t.info.run_name in page and "to_learn_acc" in page and "taalm.role" in page
        # the study run's page: the report table as its description, with a link to the trials view
        page = _dom(f"{base}/#/experiments/{exp}/runs/{study_run.info.run_id}", tmp_path / "p-study")
        assert "Top Acc" in page and "Total Knowledge" in page and "Oracle" in page
        assert f'href="#/experiments/{exp}/runs?viewStateShareKey=taalm-trials&amp;workflowType=machine_learning"' \
               in page

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
        stop_ui(proc)  # also when an assertion failed before the SIGTERM above
        log.close()

"""The `taalm` CLI: a real run, tailoring, the console script. (Bad input: tests/test_bad_input.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "run_tiny.yaml"


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    err = capsys.readouterr().err
    return e.value.code, " ".join(err.split())


def test_run_tiny_example(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(["run", str(TINY), "--out", str(out), "--set", "train.epochs=1"], capsys)
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["to_learn_acc"]) == 2 and m["config"]["train"]["epochs"] == 1
    assert "Top Acc" in err


def test_tailor_writes_split(tmp_path, capsys):
    code, err = run_cli(["data", "tailor", "--model", "tiny", "--out", str(tmp_path / "t"), "--ta-pool-size", "5"],
                        capsys)
    assert code == 0, err
    split = json.loads((tmp_path / "t" / "split.json").read_text())
    scores = json.loads((tmp_path / "t" / "scores.json").read_text())
    assert len(scores) == split["sizes"]["to_learn"] + split["sizes"]["ntf"] + split["sizes"]["ta_pool"] + sum(
        1 for s in scores if s["set"] is None)
    assert len(split["ta_pool"]) == 5
    # a random model knows almost nothing: most variant facts are TO-LEARN
    assert split["sizes"]["to_learn"] > 400


def test_entry_point_exit_code(tmp_path):
    """The installed `taalm` console script maps bad input to exit code 2."""
    exe = Path(sys.executable).with_name("taalm")
    r = subprocess.run([str(exe), "run", str(TINY), "--out", str(tmp_path / "o"), "--set", "train.lr=-1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "train.lr" in r.stderr

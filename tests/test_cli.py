"""The `taalm` CLI: a real run, and every bad-input path (message with location, exit 2, nothing written)."""

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


def _write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


BASE = TINY.read_text()


def line_of(prefix: str, shift: int = 0) -> int:
    return next(i for i, line in enumerate(BASE.splitlines(), 1) if line.startswith(prefix)) + shift


# (name, yaml text or None for the shipped example, extra argv, expected fragments of the message)
CASES = [
    ("unknown key", BASE.replace("  lr: 3.0e-3", "  lr: 3.0e-3\n  learning_rate: 1"), [],
     [f"cfg.yaml:{line_of('  lr:', 1)} (train.learning_rate)", "unknown key"]),
    ("wrong type", BASE.replace("  lr: 3.0e-3", "  lr: fast"), [], [f"cfg.yaml:{line_of('  lr:')} (train.lr)", "number"]),
    ("out of range", BASE.replace("  epochs: 3", "  epochs: -1"), [],
     [f"cfg.yaml:{line_of('  epochs:')} (train.epochs)", "greater than or equal to 0"]),
    ("bad enum", BASE.replace("  kind: full", "  kind: adapters"), [], [f"cfg.yaml:{line_of('  kind:')} (params.kind)", "'lora'"]),
    ("unknown scheme", BASE.replace("  scheme: uniform", "  scheme: uniform*oracel"), [],
     ["(weighting.scheme)", "unknown weighting scheme 'oracel'", "known:"]),
    ("yaml syntax", BASE.replace("  lr: 3.0e-3", "  lr: [3.0e-3"), [], ["cfg.yaml:", "YAML syntax error"]),
    ("not a mapping", "- a\n- b\n", [], ["cfg.yaml:1", "mapping"]),
    ("set without =", None, ["--set", "train.lr"], ["--set train.lr", "dotted.key=value"]),
    ("set unknown key", None, ["--set", "train.lrr=1"], ["--set train.lrr", "unknown key"]),
    ("set bad value", None, ["--set", "train.batch_size=0"], ["--set train.batch_size", "greater than or equal"]),
    ("bad device", None, ["--set", "device=tpu"], ["--set device: must be auto, cpu, cuda"]),
    ("random.match unknown", None, ["--set", "weighting.random.match=foo"], ["--set weighting.random", "another scheme"]),
    ("missing data dir", None, ["--set", "data.dir=/nonexistent/lama"], ["/nonexistent/lama", "not found"]),
    ("split file required", None, ["--set", "data.split=file"], ["data.split_file", "required"]),
]


@pytest.mark.parametrize("name,text,extra,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_location(name, text, extra, fragments, tmp_path, capsys):
    cfg = TINY if text is None else _write(tmp_path, text)
    out = tmp_path / "out"
    code, err = run_cli(["run", str(cfg), "--out", str(out), *extra], capsys)
    assert code == 2, err
    for frag in fragments:
        assert frag in err, (frag, err)
    assert not out.exists(), "nothing may be written on bad input"


def test_missing_config_file(tmp_path, capsys):
    code, err = run_cli(["run", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "none.yaml: no such file" in err
    assert not (tmp_path / "o").exists()


def test_malformed_data_line_via_cli(tmp_path, capsys):
    import shutil

    from trainables.data import DEFAULT_LAMA_DIR

    d = tmp_path / "lama"
    shutil.copytree(DEFAULT_LAMA_DIR, d)
    p = d / "variant.jsonl"
    p.chmod(0o644)
    lines = p.read_text().splitlines()
    lines[9] = lines[9][:-5]
    p.write_text("\n".join(lines) + "\n")
    code, err = run_cli(["run", str(TINY), "--out", str(tmp_path / "o"), "--set", f"data.dir={d}"], capsys)
    assert code == 2 and f"{p}:10" in err and "malformed JSON" in err
    code, err = run_cli(["data", "validate", str(d)], capsys)
    assert code == 2 and f"{p}:10" in err
    assert not (tmp_path / "o").exists()


def test_tailor_bad_model_and_option(tmp_path, capsys):
    code, err = run_cli(["data", "tailor", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "t")],
                        capsys)
    assert code == 2 and "model.name" in err
    code, err = run_cli(["data", "tailor", "--model", "tiny", "--task", "narrative", "--out", str(tmp_path / "t")],
                        capsys)
    assert code == 2 and "data.task" in err
    assert not (tmp_path / "t").exists()


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


META = ROOT / "examples" / "meta_tiny.yaml"


@pytest.mark.parametrize("override,fragment", [
    ("meta.objective=change4", "(meta.objective)"),
    ("meta.inner_optimizer=rmsprop", "(meta.inner_optimizer)"),
    ("meta.dummy_loop=-1", "(meta.dummy_loop)"),
    ("phi.params.kind=qlora2", "(phi.params.kind)"),
    ("meta.val_size=100000", "meta.val_size"),
])
def test_meta_train_bad_input(override, fragment, tmp_path, capsys):
    code, err = run_cli(["meta-train", str(META), "--out", str(tmp_path / "m"), "--set", override], capsys)
    assert code == 2, err
    assert fragment.strip("()") in err
    assert not (tmp_path / "m").exists()

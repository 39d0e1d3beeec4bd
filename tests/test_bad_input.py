"""Bad input, table-driven, through every command of the `taalm` CLI.

Each case gives a clear message naming what is wrong and where (``file:line (key.path)``, ``--set key``,
a file path or a config key), exits with code 2, and starts and writes nothing: the directory the case
works in is byte-for-byte unchanged afterwards (no output directory, no MLflow store, no checkpoint),
no Ray instance is running and no child process was left behind.

The number of cases is asserted (``N_CASES``) so that dropping one is a visible change.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "run_tiny.yaml"
META = ROOT / "examples" / "meta_tiny.yaml"
TW = ROOT / "examples" / "temporalwiki_tiny.yaml"
SMOKE = ROOT / "ablations" / "smoke_tiny.yaml"
RUN_TEXT = TINY.read_text()
TW_FIXTURE = ROOT / "tests" / "fixtures" / "temporalwiki"


def line_of(text: str, prefix: str, shift: int = 0) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith(prefix)) + shift


# ---- preparations: build the (bad) inputs of a case inside its working directory -------------------------

def lama_copy(tmp: Path) -> Path:
    from trainables.data import DEFAULT_LAMA_DIR

    d = tmp / "lama"
    shutil.copytree(DEFAULT_LAMA_DIR, d)
    for p in d.iterdir():
        p.chmod(0o644)
    return d


def lama_line(name: str, lineno: int, edit: Callable[[str], str]):
    def prep(tmp: Path) -> None:
        p = lama_copy(tmp) / name
        lines = p.read_text().splitlines()
        lines[lineno - 1] = edit(lines[lineno - 1])
        p.write_text("\n".join(lines) + "\n")
    return prep


def drop_field(name: str):
    def edit(line: str) -> str:
        rec = json.loads(line)
        del rec[name]
        return json.dumps(rec)
    return edit


def set_field(name: str, value):
    def edit(line: str) -> str:
        return json.dumps({**json.loads(line), name: value})
    return edit


def lama_without(name: str):
    def prep(tmp: Path) -> None:
        (lama_copy(tmp) / name).unlink()
    return prep


def loop_checkpoint(files: dict[str, bytes]):
    """An output directory holding a (damaged) loop checkpoint, as an interrupted `taalm run` leaves it."""
    def prep(tmp: Path) -> None:
        d = tmp / "out" / "checkpoint"
        d.mkdir(parents=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
    return prep


def valid_tensors_bad_state(tmp: Path) -> None:
    """Real safetensors files, but a state.json cut off in the middle."""
    import torch
    from safetensors.torch import save_file

    d = tmp / "out" / "checkpoint"
    d.mkdir(parents=True)
    for name in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors"):
        save_file({"x": torch.zeros(1)}, str(d / name))
    (d / "state.json").write_text('{"epoch": 1,\n "history": {')


def phi_dir(files: dict[str, bytes]):
    def prep(tmp: Path) -> None:
        d = tmp / "phi"
        d.mkdir()
        for name, data in files.items():
            (d / name).write_bytes(data)
    return prep


def study_dir(study_json: Optional[str]):
    def prep(tmp: Path) -> None:
        d = tmp / "study"
        d.mkdir()
        if study_json is not None:
            (d / "study.json").write_text(study_json)
    return prep


def sqlite_study(tmp: Path) -> None:
    """A study directory whose study.json names a (not yet created) sqlite store in it."""
    d = tmp / "study"
    d.mkdir()
    (d / "study.json").write_text(json.dumps({"tracking_uri": f"sqlite:///{d / 'mlflow.db'}", "name": "s",
                                              "kind": "grid"}))


def _listening_port() -> int:
    """A port on 127.0.0.1 that something listens on for the whole test session (`taalm ui` on a port in use)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    _LISTENING.append(s)
    return s.getsockname()[1]


_LISTENING: list = []
BUSY_PORT = _listening_port()


def write_bytes(rel: str, data: bytes):
    def prep(tmp: Path) -> None:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data.replace(b"BASE", str(TINY).encode()))
    return prep


def lama_latin1_line(name: str, lineno: int):
    """A LAMA file whose line ``lineno`` was saved as Latin-1 (an é that is not UTF-8)."""
    def prep(tmp: Path) -> None:
        p = lama_copy(tmp) / name
        lines = p.read_bytes().split(b"\n")
        rec = json.loads(lines[lineno - 1])
        rec["subject"] = rec["subject"] + " caf\u00e9"
        # every other non-ASCII character stays a \u escape (the line may hold an en dash, which Latin-1
        # cannot encode); only the é becomes the single Latin-1 byte 0xE9, which is not UTF-8
        lines[lineno - 1] = json.dumps(rec).replace("caf\\u00e9", "caf\u00e9").encode("latin-1")
        p.write_bytes(b"\n".join(lines))
    return prep


def model_dir_with_another_tokenizer(tmp: Path) -> None:
    """A directory holding a model config and a tokenizer that is θ's plus one token (for weighting.rho1.reference)."""
    from transformers import AutoTokenizer

    from trainables.models import smollm2_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    tok.add_tokens(["<not-in-theta>"])
    tok.save_pretrained(tmp / "ref")
    (tmp / "ref" / "config.json").write_text('{"model_type": "llama"}')


def not_a_model_dir(tmp: Path) -> None:
    (tmp / "ref").mkdir()
    (tmp / "ref" / "notes.txt").write_text("not a model")


LATIN1_CFG = RUN_TEXT.encode() + "# réglages\n".encode("latin-1")
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


@dataclass
class Case:
    id: str
    category: str
    argv: list[str]  # {T}: the case's working directory
    fragments: list[str]  # all must appear in the message ({T} substituted)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> text ({T} substituted)
    prep: Optional[Callable[[Path], None]] = None
    env: dict[str, str] = field(default_factory=dict)


def run_case(text: str) -> dict[str, str]:
    return {"cfg.yaml": text}


def grid(text: str) -> dict[str, str]:
    return {"g.yaml": text.replace("BASE", str(TINY))}


def space(text: str) -> dict[str, str]:
    return {"s.yaml": text.replace("BASE", str(TINY))}


RUN = ["run", "{T}/cfg.yaml", "--out", "{T}/out"]
RUN_TINY = ["run", str(TINY), "--out", "{T}/out"]
ABLATE = ["ablate", "{T}/g.yaml", "--out", "{T}/studies"]
TUNE = ["tune", "{T}/s.yaml", "--out", "{T}/studies"]
META_TRAIN = ["meta-train", str(META), "--out", "{T}/m"]
TEMPORALWIKI = ["temporalwiki", str(TW), "--out", "{T}/tw"]
LINE_LR = line_of(RUN_TEXT, "  lr:")
SPACE = "name: s\nbase: BASE\nspace:\n"
GARBAGE = b"\x00\x01 not safetensors"

CASES = [
    # --- YAML syntax -------------------------------------------------------------------------------------
    Case("run: unclosed list", "yaml syntax", RUN, ["cfg.yaml:", "YAML syntax error"],
         run_case(RUN_TEXT.replace("  lr: 3.0e-3", "  lr: [3.0e-3"))),
    Case("run: top level is a list", "yaml syntax", RUN, ["cfg.yaml:1", "mapping"], run_case("- a\n- b\n")),
    Case("run: tab indentation", "yaml syntax", RUN, ["cfg.yaml:", "YAML syntax error"],
         run_case(RUN_TEXT.replace("  lr: 3.0e-3", "\tlr: 3.0e-3"))),
    Case("grid: unclosed mapping", "yaml syntax", ABLATE, ["g.yaml:", "YAML syntax error"],
         grid("name: g\nbase: BASE\naxes: {train.lr: [1]\n")),
    Case("search: bad indentation", "yaml syntax", TUNE, ["s.yaml:", "YAML syntax error"],
         space(SPACE + "  train.lr: {type: float, low: 0.1, high: 0.2}\n bad: 1\n")),
    Case("meta-train: --set value", "yaml syntax", META_TRAIN + ["--set", "meta.steps=[1"], ["--set meta.steps"]),
    # --- unknown keys --------------------------------------------------------------------------------------
    Case("run: unknown key", "unknown key", RUN, [f"cfg.yaml:{LINE_LR + 1} (train.learning_rate)", "unknown key"],
         run_case(RUN_TEXT.replace("  lr: 3.0e-3", "  lr: 3.0e-3\n  learning_rate: 1"))),
    Case("run: unknown section", "unknown key", RUN, ["cfg.yaml:", "(trainer)", "unknown key"],
         run_case(RUN_TEXT + "trainer:\n  lr: 1\n")),
    Case("run: --set unknown key", "unknown key", RUN_TINY + ["--set", "train.lrr=1"],
         ["--set train.lrr", "unknown key"]),
    Case("grid: unknown key", "unknown key", ABLATE, ["g.yaml:3 (axis)", "unknown key"],
         grid("name: g\nbase: BASE\naxis:\n  train.lr: [1]\n")),
    Case("grid: axis is not a config key", "unknown key", ABLATE, ["train.learning_rate", "unknown key"],
         grid("name: g\nbase: BASE\naxes:\n  train.learning_rate: [0.1]\n")),
    Case("grid: unknown resources key", "unknown key", ABLATE, ["g.yaml:3 (resources.gpu)"],
         grid("name: g\nbase: BASE\nresources: {gpu: 1}\n")),
    Case("search: not a config key", "unknown key", TUNE, ["(space.train.learning_rate)", "unknown key"],
         space(SPACE + "  train.learning_rate: {type: float, low: 0.1, high: 0.2}\n")),
    Case("temporalwiki: unknown key", "unknown key", TEMPORALWIKI + ["--set", "temporalwiki.epochs=2"],
         ["--set temporalwiki.epochs", "unknown key"]),
    # --- wrong types ---------------------------------------------------------------------------------------
    Case("run: string for a number", "wrong type", RUN, [f"cfg.yaml:{LINE_LR} (train.lr)", "number"],
         run_case(RUN_TEXT.replace("  lr: 3.0e-3", "  lr: fast"))),
    Case("run: unknown parameterisation", "unknown name", RUN,
         [f"cfg.yaml:{line_of(RUN_TEXT, '  kind:')} (params.kind)", "unknown parameterisation 'adapters'",
          "full, kadapter, lora, qlora"],
         run_case(RUN_TEXT.replace("  kind: full", "  kind: adapters"))),
    Case("run: --set device", "wrong type", RUN_TINY + ["--set", "device=tpu"], ["--set device", "auto, cpu, cuda"]),
    Case("run: --set without =", "wrong type", RUN_TINY + ["--set", "train.lr"], ["--set train.lr", "dotted.key=value"]),
    Case("grid: axis not a list", "wrong type", ABLATE, ["g.yaml:", "(axes.train.lr)"],
         grid("name: g\nbase: BASE\naxes:\n  train.lr: 0.1\n")),
    Case("grid: the old key `reference`", "unknown key", ABLATE, ["g.yaml:3 (reference)", "renamed to `baseline`"],
         grid("name: g\nbase: BASE\nreference: Finetune\n")),
    Case("report: the old option --reference", "unknown key", ["report", "{T}/study", "--reference", "Finetune"],
         ["--reference", "renamed to --baseline"], prep=study_dir(None)),
    Case("run: rho1 selection unknown", "wrong type", RUN_TINY + ["--set", "weighting.rho1.selection=top_k"],
         ["--set weighting.rho1.selection", "'excess_loss' or 'release'"]),
    Case("run: rho1 reference model with another tokenizer", "wrong type",
         RUN_TINY + ["--set", "weighting.scheme=rho1", "--set", "weighting.rho1.reference={T}/ref"],
         ["weighting.rho1.reference", "must share θ's tokenizer"], prep=model_dir_with_another_tokenizer),
    Case("search: unknown distribution", "wrong type", TUNE, ["(space.train.lr.type)"],
         space(SPACE + "  train.lr: {type: gaussian, low: 1, high: 2}\n")),
    Case("meta-train: objective", "wrong type", META_TRAIN + ["--set", "meta.objective=change4"], ["meta.objective"]),
    Case("meta-train: inner optimizer", "wrong type", META_TRAIN + ["--set", "meta.inner_optimizer=rmsprop"],
         ["meta.inner_optimizer"]),
    Case("meta-train: φ parameters", "wrong type", META_TRAIN + ["--set", "phi.params.kind=qlora2"],
         ["phi.params.kind"]),
    Case("report: study.json not JSON", "wrong type", ["report", "{T}/study"], ["{T}/study/study.json:1"],
         prep=study_dir("{not json")),
    Case("resume: study.json not JSON", "wrong type", ["resume", "{T}/study"], ["{T}/study/study.json:1"],
         prep=study_dir("{not json")),
    Case("ablate: fault injection epoch not a number", "wrong type",
         ["ablate", str(SMOKE), "--out", "{T}/studies"], ["TAALM_INJECT_FAULT=one", "expected INDEX"],
         env={"TAALM_INJECT_FAULT": "one"}),
    # --- out-of-range values -------------------------------------------------------------------------------
    Case("run: negative epochs", "out of range", RUN,
         [f"cfg.yaml:{line_of(RUN_TEXT, '  epochs:')} (train.epochs)", "greater than or equal to 0"],
         run_case(RUN_TEXT.replace("  epochs: 3", "  epochs: -1"))),
    Case("run: precision fp16", "wrong type", RUN_TINY + ["--set", "train.precision=fp16"],
         ["--set train.precision", "'fp32' or 'bf16'"]),
    Case("run: oom policy", "wrong type", RUN_TINY + ["--set", "train.oom=retry"], ["--set train.oom", "halve_batch"]),
    Case("run: attention kernel", "wrong type", RUN_TINY + ["--set", "model.attention=flash"],
         ["--set model.attention", "'eager' or 'sdpa'"]),
    Case("temporalwiki: filter unknown", "wrong type", TEMPORALWIKI + ["--set", "temporalwiki.filter=talm"],
         ["--set temporalwiki.filter", "'none' or 'taalm'"]),
    Case("temporalwiki: long_docs unknown", "wrong type", TEMPORALWIKI + ["--set", "temporalwiki.long_docs=split"],
         ["--set temporalwiki.long_docs", "'truncate' or 'chunk'"]),
    Case("run: micro-batch 0", "out of range", RUN_TINY + ["--set", "train.micro_batch_size=0"],
         ["--set train.micro_batch_size", "greater than or equal to 1"]),
    Case("run: SEEKR with fused attention", "out of range",
         RUN_TINY + ["--set", "replay.kind=seekr", "--set", "model.attention=sdpa"],
         ["--set model.attention", "SEEKR distils attention maps"]),
    Case("meta-train: fused attention", "out of range", META_TRAIN + ["--set", "model.attention=sdpa"],
         ["--set model.attention", "second order", "eager"]),
    Case("grid: a GPU fraction for Ray Train workers", "out of range", ABLATE,
         ["(resources.gpus_per_worker)", "only for single-worker lean trials"],
         grid("name: g\nbase: BASE\nresources: {workers: 2, gpus_per_worker: 0.5}\n")),
    Case("grid: 1.5 GPUs", "out of range", ABLATE, ["(resources.gpus_per_worker)", "whole GPUs"],
         grid("name: g\nbase: BASE\nresources: {gpus_per_worker: 1.5}\n")),
    Case("ablate: --num-gpus -1", "out of range", ["ablate", str(SMOKE), "--out", "{T}/studies", "--num-gpus", "-1"],
         ["'--num-gpus'"]),
    Case("run: --set batch size 0", "out of range", RUN_TINY + ["--set", "train.batch_size=0"],
         ["--set train.batch_size", "greater than or equal"]),
    Case("run: --set negative lr", "out of range", RUN_TINY + ["--set", "train.lr=-1"], ["--set train.lr"]),
    Case("grid: value in an axis", "out of range", ABLATE, ["g.yaml:4", "train.lr", "greater than 0", "seed 0"],
         grid("name: g\nbase: BASE\naxes:\n  train.lr: [0.1, -1]\n")),
    Case("grid: workers 0", "out of range", ABLATE, ["(resources.workers)"],
         grid("name: g\nbase: BASE\nresources: {workers: 0}\n")),
    Case("grid: --set max_concurrent 0", "out of range",
         ["ablate", str(SMOKE), "--out", "{T}/studies", "--set", "resources.max_concurrent=0"],
         ["--set resources.max_concurrent"]),
    Case("grid: time budget 0", "out of range", ABLATE, ["(resources.time_budget_s)"],
         grid("name: g\nbase: BASE\nresources: {time_budget_s: 0}\n")),
    Case("search: low >= high", "out of range", TUNE, ["(space.train.lr)", "low < high"],
         space(SPACE + "  train.lr: {type: float, low: 0.1, high: 0.01}\n")),
    Case("search: log scale from 0", "out of range", TUNE, ["log scale"],
         space(SPACE + "  train.lr: {type: float, low: 0, high: 0.01, log: true}\n")),
    Case("search: corner outside the schema", "out of range", TUNE, ["(space.train.lr)", "greater than 0"],
         space(SPACE + "  train.lr: {type: float, low: -1.0, high: 0.2}\n")),
    Case("meta-train: dummy_loop -1", "out of range", META_TRAIN + ["--set", "meta.dummy_loop=-1"],
         ["meta.dummy_loop"]),
    Case("meta-train: validation set too large", "out of range", META_TRAIN + ["--set", "meta.val_size=100000"],
         ["meta.val_size"]),
    Case("meta-train: vmap_chunk 0", "out of range", META_TRAIN + ["--set", "meta.vmap_chunk=0"],
         ["--set meta.vmap_chunk", "greater than or equal to 1"]),
    Case("ray start: --num-cpus 0", "out of range", ["ray", "start", "--num-cpus", "0"], ["--num-cpus", "must be >= 1"]),
    Case("ray start: --port below 1024", "out of range", ["ray", "start", "--port", "80"],
         ["--port", "1024..65535", "got 80"]),
    Case("ray start: --port not a number", "wrong type", ["ray", "start", "--port", "abc"], ["'--port'", "valid integer"]),
    Case("ablate: a trial needs more CPUs than the local Ray instance has", "out of range",
         ["ablate", str(SMOKE), "--out", "{T}/studies", "--num-cpus", "1", "--set", "resources.workers=2",
          "--set", "resources.lean=false"],
         ["resources.cpus_per_worker", "a trial needs 2 CPUs", "the local Ray instance has 1"]),
    Case("ablate: --num-cpus 0", "out of range", ["ablate", str(SMOKE), "--out", "{T}/studies", "--num-cpus", "0"],
         ["--num-cpus", "must be >= 1", "no trial"]),
    Case("tune: meta_cpus beyond the local Ray instance", "out of range",
         TUNE + ["--num-cpus", "1"], ["resources.meta_cpus", "3 CPUs asked for meta-training", "has 1"],
         space(SPACE + "  train.lr: {type: float, low: 0.001, high: 0.01}\nresources: {meta_cpus: 3}\n")),
    Case("grid: keep_weights_gb negative", "out of range", ABLATE, ["(resources.keep_weights_gb)"],
         grid("name: g\nbase: BASE\nresources: {keep_weights_gb: -1}\n")),
    Case("grid: lean not a boolean", "wrong type", ABLATE, ["(resources.lean)"],
         grid("name: g\nbase: BASE\nresources: {lean: sometimes}\n")),
    Case("ui: --port not a number", "wrong type", ["ui", "{T}/study", "--port", "abc"], ["'--port'", "valid integer"],
         prep=study_dir(None)),
    Case("report: --epochs 0", "out of range", ["report", "{T}/study", "--epochs", "0"], ["--epochs"],
         prep=study_dir(None)),
    Case("report: --nf-epoch -1", "out of range", ["report", "{T}/study", "--nf-epoch", "-1"], ["--nf-epoch"],
         prep=study_dir(None)),
    Case("temporalwiki: max_docs_per_period 0", "out of range",
         TEMPORALWIKI + ["--set", "temporalwiki.max_docs_per_period=0"],
         ["--set temporalwiki.max_docs_per_period", "greater than or equal to 1"]),
    Case("temporalwiki: diff_size and max_docs_per_period differ", "out of range",
         TEMPORALWIKI + ["--set", "temporalwiki.max_docs_per_period=8", "--set", "temporalwiki.diff_size=4"],
         ["temporalwiki", "give max_docs_per_period (diff_size is its former name), not both"]),
    Case("ui: --port in use", "out of range", ["ui", "{T}/study", "--port", str(BUSY_PORT)],
         ["--port", f"127.0.0.1:{BUSY_PORT} is in use"], prep=sqlite_study),
    Case("tailor: pool size 0", "out of range", ["data", "tailor", "--model", "tiny", "--out", "{T}/t",
                                                 "--ta-pool-size", "0"], ["--ta-pool-size"]),
    Case("run: RecAdam pull overshoots", "out of range",
         RUN_TINY + ["--set", "regularizer.kind=recadam", "--set", "regularizer.recadam.pretrain_coef=5000"],
         ["--set regularizer.recadam.pretrain_coef", "pretrain_coef × train.lr must be < 2", "5000 × 0.003 = 15"]),
    Case("run: rho1 release table shorter than a document", "out of range",
         RUN_TINY + ["--set", "weighting.scheme=rho1", "--set", "weighting.rho1.selection=release",
                     "--set", "weighting.rho1.table_length=16"],
         ["--set weighting.rho1.table_length", "train.max_length = 64"]),
    Case("run: release-style rho1 twice in a product", "out of range",
         RUN_TINY + ["--set", "weighting.scheme=rho1*rho1", "--set", "weighting.rho1.selection=release"],
         ["--set weighting.scheme", "may hold it once"]),
    Case("grid: memory_gb 0", "out of range", ABLATE, ["g.yaml:3 (resources.memory_gb)", "greater than 0"],
         grid("name: g\nbase: BASE\nresources: {memory_gb: 0}\n")),
    Case("grid: memory_gb not a number", "wrong type", ABLATE, ["g.yaml:3 (resources.memory_gb)", "number"],
         grid("name: g\nbase: BASE\nresources: {memory_gb: lots}\n")),
    Case("grid: memory_gb beyond this machine", "out of range", ABLATE,
         ["g.yaml:3 (resources.memory_gb)", "100000 GB per trial worker", "more than this machine's"],
         grid("name: g\nbase: BASE\nresources: {memory_gb: 100000}\n")),
    Case("grid: memory_gb beyond this machine, --address local", "out of range", ABLATE + ["--address", "local"],
         ["g.yaml:3 (resources.memory_gb)", "more than this machine's"],
         grid("name: g\nbase: BASE\nresources: {memory_gb: 100000}\n")),
    Case("search: --set memory_gb beyond this machine", "out of range",
         TUNE + ["--set", "resources.memory_gb=100000"], ["--set resources.memory_gb", "more than this machine's"],
         space(SPACE + "  train.lr: {type: float, low: 0.1, high: 0.2}\n")),
    Case("tune: fault injection with a label", "unknown name", TUNE, ["TAALM_INJECT_FAULT=1:Finetune",
                                                                     "a search's trials have no labels"],
         space(SPACE + "  train.lr: {type: float, low: 0.1, high: 0.2}\n"), env={"TAALM_INJECT_FAULT": "1:Finetune"}),
    Case("ablate: fault injection for an unknown label", "unknown name",
         ["ablate", str(SMOKE), "--out", "{T}/studies"], ["TAALM_INJECT_FAULT=1:Finetun", "Finetune, Oracle"],
         env={"TAALM_INJECT_FAULT": "1:Finetun"}),
    # --- empty axes and other empty collections ----------------------------------------------------------------
    Case("grid: empty axis", "empty", ABLATE, ["g.yaml:3 (axes)", "no values"],
         grid("name: g\nbase: BASE\naxes:\n  train.lr: []\n")),
    Case("grid: zip of unequal lengths", "empty", ABLATE, ["(zip)", "equal"],
         grid("name: g\nbase: BASE\nzip:\n  - {train.lr: [1, 2], train.epochs: [1]}\n")),
    Case("grid: everything excluded", "empty", ABLATE, ["(exclude)", "every trial"],
         grid("name: g\nbase: BASE\naxes:\n  train.lr: [0.1]\nexclude:\n  - {train.lr: 0.1}\n")),
    Case("grid: no seeds", "empty", ABLATE, ["(seeds)"], grid("name: g\nbase: BASE\nseeds: []\n")),
    Case("grid: repeated seeds", "empty", ABLATE, ["(seeds)", "repeats"],
         grid("name: g\nbase: BASE\nseeds: [1, 1]\n")),
    Case("search: empty space", "empty", TUNE, ["at least one parameter"], space("name: s\nbase: BASE\nspace: {}\n")),
    Case("search: no choices", "empty", TUNE, ["(space.weighting.scheme)"],
         space(SPACE + "  weighting.scheme: {type: categorical, choices: []}\n")),
    Case("temporalwiki: no periods", "empty", TEMPORALWIKI + ["--set", "temporalwiki.periods=[]"], ["periods"]),
    # --- unknown scheme / method names ----------------------------------------------------------------------
    Case("run: unknown scheme", "unknown name", RUN, ["(weighting.scheme)", "unknown weighting scheme 'oracel'",
                                                      "known:"],
         run_case(RUN_TEXT.replace("  scheme: uniform", "  scheme: uniform*oracel"))),
    Case("run: random.match unknown", "unknown name", RUN_TINY + ["--set", "weighting.random.match=foo"],
         ["--set weighting.random", "another scheme"]),
    Case("run: unknown model", "unknown name", RUN_TINY + ["--set", "model.name=no-such-model"], ["model.name"]),
    Case("run: unknown replay kind", "unknown name", RUN_TINY + ["--set", "replay.kind=replay_all"], ["replay.kind"]),
    Case("grid: unknown scheme in an axis", "unknown name", ABLATE,
         ["weighting.scheme", "unknown weighting scheme 'oracel'"],
         grid("name: g\nbase: BASE\naxes:\n  weighting.scheme: [uniform, oracel]\n")),
    Case("grid: TAALM without a meta stage", "unknown name", ABLATE, ["(meta)"],
         grid("name: g\nbase: BASE\naxes:\n  weighting.scheme: [train_attention]\n")),
    Case("grid: bad study name", "unknown name", ABLATE, ["(name)"], grid("name: 'a b'\nbase: BASE\n")),
    Case("ablate: a storage no filesystem opens", "unknown name", ABLATE + ["--storage", "nosuch://bucket/runs"],
         ["--storage: nosuch://bucket/runs: not a storage pyarrow can open"], grid("name: g\nbase: BASE\n")),
    Case("grid: a storage no filesystem opens", "unknown name", ABLATE,
         ["g.yaml:3 (storage): nosuch://bucket/runs: not a storage pyarrow can open"],
         grid("name: g\nbase: BASE\nstorage: nosuch://bucket/runs\n")),
    Case("tune: a storage no filesystem opens", "unknown name", TUNE + ["--storage", "nosuch://b"],
         ["--storage: nosuch://b: not a storage pyarrow can open"],
         space(SPACE + "  train.lr: {type: float, low: 0.1, high: 0.2}\n")),
    Case("search: unknown scheme choice", "unknown name", TUNE, ["(space.weighting.scheme)", "nope"],
         space(SPACE + "  weighting.scheme: {type: categorical, choices: [uniform, nope]}\n")),
    Case("search: condition on a later key", "unknown name", TUNE, ["listed before"],
         space(SPACE + "  weighting.rho1.k: {type: float, low: 0.1, high: 0.5, when: {weighting.scheme: rho1}}\n"
                       "  weighting.scheme: {type: categorical, choices: [rho1]}\n")),
    Case("search: three objectives", "out of range", TUNE, ["one or two objectives"],
         space(SPACE + "  train.lr: {type: float, low: 0.1, high: 0.2}\nobjectives: [{metric: top_acc}, "
                       "{metric: nf_acc}, {metric: ntf_acc}]\n")),
    Case("search: unknown objective metric", "unknown name", TUNE, ["objectives"],
         space(SPACE + "  train.lr: {type: float, low: 0.1, high: 0.2}\nobjectives: [{metric: accuracy}]\n")),
    Case("tailor: unknown task", "unknown name", ["data", "tailor", "--model", "tiny", "--task", "narrative",
                                                 "--out", "{T}/t"], ["data.task"]),
    Case("temporalwiki: period without probes", "unknown name",
         TEMPORALWIKI + ["--set", f'temporalwiki.periods=[{{name: "0708", diff: "{TW_FIXTURE}/0910.jsonl"}}]'],
         ["no shipped changed probes"]),
    # --- missing files --------------------------------------------------------------------------------------
    Case("run: missing config file", "missing file", ["run", "{T}/none.yaml", "--out", "{T}/out"],
         ["none.yaml: no such file"]),
    Case("run: missing data dir", "missing file", RUN_TINY + ["--set", "data.dir=/nonexistent/lama"],
         ["/nonexistent/lama", "not found"]),
    Case("run: data file missing", "missing file", RUN_TINY + ["--set", "data.dir={T}/lama"],
         ["{T}/lama/invariant_descriptive.jsonl", "data file not found"],
         prep=lama_without("invariant_descriptive.jsonl")),
    Case("run: split file required", "missing file", RUN_TINY + ["--set", "data.split=file"],
         ["data.split_file", "required"]),
    Case("run: split file missing", "missing file",
         RUN_TINY + ["--set", "data.split=file", "--set", "data.split_file={T}/split.json"], ["split.json"]),
    Case("run: base model path missing", "missing file", RUN_TINY + ["--set", "model.name={T}/no-model"],
         ["model.name"]),
    Case("tailor: model path missing", "missing file", ["data", "tailor", "--model", "{T}/no-model", "--out", "{T}/t"],
         ["model.name"]),
    Case("run: rho1 reference model missing", "missing file",
         RUN_TINY + ["--set", "weighting.scheme=rho1", "--set", "weighting.rho1.reference={T}/no-model"],
         ["--set weighting.rho1.reference", "{T}/no-model", "is not a directory"]),
    Case("run: rho1 reference is not a model", "missing file",
         RUN_TINY + ["--set", "weighting.rho1.reference={T}/ref"],
         ["--set weighting.rho1.reference", "no config.json"], prep=not_a_model_dir),
    Case("grid: rho1 reference missing in an axis", "missing file", ABLATE,
         ["g.yaml:4", "weighting.rho1.reference", "not a directory"],
         grid("name: g\nbase: BASE\naxes:\n  weighting.rho1.reference: [initial, nowhere]\n")),
    Case("grid: base missing", "missing file", ABLATE, ["(base)", "not found"],
         grid("name: g\nbase: nowhere.yaml\n")),
    Case("grid: meta config missing", "missing file", ABLATE, ["(meta", "not found"],
         grid("name: g\nbase: BASE\nmeta: {config: nowhere.yaml}\naxes:\n  weighting.scheme: [train_attention]\n")),
    Case("temporalwiki: diff file missing", "missing file",
         TEMPORALWIKI + ["--set", 'temporalwiki.periods=[{name: "0910", diff: "{T}/none.jsonl"}]'], ["none.jsonl"]),
    Case("meta-train: records file missing", "missing file", META_TRAIN + ["--set", "records={T}/none.jsonl"],
         ["none.jsonl"]),
    Case("resume: not a study", "missing file", ["resume", "{T}/study"], ["{T}/study", "no study.json"],
         prep=study_dir(None)),
    Case("report: not a study", "missing file", ["report", "{T}/study"], ["{T}/study", "no study.json"],
         prep=study_dir(None)),
    Case("data validate: missing dir", "missing file", ["data", "validate", "{T}/nope"], ["{T}/nope", "not found"]),
    # --- malformed JSON-lines ---------------------------------------------------------------------------------
    Case("run: truncated JSON line", "malformed jsonl", RUN_TINY + ["--set", "data.dir={T}/lama"],
         ["{T}/lama/variant.jsonl:10", "malformed JSON"], prep=lama_line("variant.jsonl", 10, lambda s: s[:-5])),
    Case("data validate: missing field", "malformed jsonl", ["data", "validate", "{T}/lama"],
         ["{T}/lama/invariant_schematic.jsonl:42", "'evidence'", "missing"],
         prep=lama_line("invariant_schematic.jsonl", 42, drop_field("evidence"))),
    Case("data validate: empty object", "malformed jsonl", ["data", "validate", "{T}/lama"],
         ["{T}/lama/variant.jsonl:1", "'object'"], prep=lama_line("variant.jsonl", 1, set_field("object", "  "))),
    Case("data validate: object is a list", "malformed jsonl", ["data", "validate", "{T}/lama"],
         ["{T}/lama/variant.jsonl:3"], prep=lama_line("variant.jsonl", 3, set_field("object", ["Brazil"]))),
    Case("tailor: malformed line", "malformed jsonl", ["data", "tailor", "--model", "tiny", "--data-dir", "{T}/lama",
                                                       "--out", "{T}/t"], ["{T}/lama/variant.jsonl:5"],
         prep=lama_line("variant.jsonl", 5, lambda s: "not json")),
    Case("temporalwiki: diff line without text", "malformed jsonl",
         TEMPORALWIKI + ["--set", 'temporalwiki.periods=[{name: "0910", diff: "{T}/bad.jsonl"}]'], ["bad.jsonl:2"],
         {"bad.jsonl": '{"text": "fine"}\n{"txt": "no text field"}\n'}),
    Case("meta-train: records line malformed", "malformed jsonl",
         META_TRAIN + ["--set", "records={T}/records.jsonl"], ["records.jsonl:2"],
         {"records.jsonl": (TW_FIXTURE / "records.jsonl").read_text().splitlines()[0] + "\n{\"text\": 1\n"}),
    Case("run: split file not JSON", "malformed jsonl",
         RUN_TINY + ["--set", "data.split=file", "--set", "data.split_file={T}/split.json"], ["{T}/split.json"],
         {"split.json": "{\"to_learn\": [\n"}),
    # --- corrupt checkpoints ---------------------------------------------------------------------------------
    Case("run: garbage loop checkpoint", "corrupt checkpoint", RUN_TINY, ["{T}/out/checkpoint", "corrupt checkpoint"],
         prep=loop_checkpoint({f: GARBAGE for f in ("trainable.safetensors", "optimizer.safetensors",
                                                     "rng.safetensors")} | {"state.json": b"{}"})),
    Case("run: loop checkpoint file missing", "corrupt checkpoint", RUN_TINY, ["checkpoint file missing"],
         prep=loop_checkpoint({"state.json": b"{}"})),
    Case("run: loop checkpoint state cut off", "corrupt checkpoint", RUN_TINY,
         ["{T}/out/checkpoint/state.json:", "corrupt checkpoint state"], prep=valid_tensors_bad_state),
    Case("run: φ metadata not JSON", "corrupt checkpoint",
         RUN_TINY + ["--set", "weighting.scheme=train_attention", "--set", "weighting.train_attention.phi={T}/phi"],
         ["{T}/phi/phi.json", "corrupt Train-Attention metadata"],
         prep=phi_dir({"phi.json": b"{oops", "phi.safetensors": GARBAGE})),
    Case("run: φ directory empty", "corrupt checkpoint",
         RUN_TINY + ["--set", "weighting.scheme=train_attention", "--set", "weighting.train_attention.phi={T}/phi"],
         ["{T}/phi", "not a Train-Attention checkpoint"], prep=phi_dir({})),
    Case("run: φ of an unknown format", "corrupt checkpoint",
         RUN_TINY + ["--set", "weighting.scheme=train_attention", "--set", "weighting.train_attention.phi={T}/phi"],
         ["{T}/phi/phi.json", "unknown format"],
         prep=phi_dir({"phi.json": b'{"format": "pickle"}', "phi.safetensors": GARBAGE})),
    Case("run: TAALM without φ", "corrupt checkpoint", RUN_TINY + ["--set", "weighting.scheme=train_attention"],
         ["weighting.train_attention.phi"]),
    # --- files that are not UTF-8 text ------------------------------------------------------------------------
    Case("run: Latin-1 config", "not utf-8", RUN, [f"cfg.yaml:{len(RUN_TEXT.splitlines()) + 1}", "not UTF-8",
                                                   "0xe9"], prep=write_bytes("cfg.yaml", LATIN1_CFG)),
    Case("ablate: a PNG passed as the grid", "not utf-8", ABLATE, ["g.yaml:1", "not UTF-8", "0x89"],
         prep=write_bytes("g.yaml", PNG)),
    Case("run: Latin-1 line in the data", "not utf-8", RUN_TINY + ["--set", "data.dir={T}/lama"],
         ["{T}/lama/variant.jsonl:7", "not UTF-8"], prep=lama_latin1_line("variant.jsonl", 7)),
    Case("run: φ metadata not UTF-8", "not utf-8",
         RUN_TINY + ["--set", "weighting.scheme=train_attention", "--set", "weighting.train_attention.phi={T}/phi"],
         ["{T}/phi/phi.json:1", "not UTF-8"], prep=phi_dir({"phi.json": PNG, "phi.safetensors": GARBAGE})),
    Case("report: study.json not UTF-8", "not utf-8", ["report", "{T}/study"], ["{T}/study/study.json:1", "not UTF-8"],
         prep=write_bytes("study/study.json", b'{"name": "caf\xe9"}')),
    # --- a key given twice in one YAML mapping ----------------------------------------------------------------
    Case("run: lr twice", "duplicate key", RUN, [f"cfg.yaml:{LINE_LR + 1} (train.lr)", f"also at line {LINE_LR}"],
         run_case(RUN_TEXT.replace("  lr: 3.0e-3", "  lr: 3.0e-3\n  lr: 1.0e-3"))),
    Case("grid: name twice", "duplicate key", ABLATE, ["g.yaml:3 (name)", "duplicate key 'name'", "also at line 1"],
         grid("name: g\nbase: BASE\nname: h\n")),
    Case("search: a parameter twice", "duplicate key", TUNE, ["s.yaml:5 (space.train.lr)", "also at line 4"],
         space(SPACE + "  train.lr: {type: float, low: 0.1, high: 0.2}\n  train.lr: {type: float, low: 0.3, high: 0.4}\n")),
    # --- requested sizes beyond what exists, empty evaluation sets ---------------------------------------------
    Case("run: more TO-LEARN facts than exist", "out of range", RUN_TINY + ["--set", "data.to_learn_size=100000"],
         ["data.to_learn_size", "requested 100000 facts, but only", "TO-LEARN facts exist"]),
    Case("run: more NOT-TO-FORGET facts than exist", "out of range", RUN_TINY + ["--set", "data.ntf_size=5000"],
         ["data.ntf_size", "requested 5000 facts, but only", "NOT-TO-FORGET facts exist"]),
    Case("meta-train: a pool larger than exists", "out of range", META_TRAIN + ["--set", "meta.pool_size=100000"],
         ["meta.pool_size", "requested 100000 facts", "data.max_doc_tokens filter"]),
    Case("run: NOT-TO-FORGET empty (a random model tailored on itself)", "empty",
         RUN_TINY + ["--set", "data.split=tailored"], ["data.split", "NOT-TO-FORGET set is empty", "data.split: release"]),
    Case("run: TO-LEARN empty after the length filter", "empty", RUN_TINY + ["--set", "data.max_doc_tokens=4"],
         ["data.split", "TO-LEARN set is empty", "data.max_doc_tokens"]),
]

N_CASES = 148
CATEGORIES = {"yaml syntax", "unknown key", "wrong type", "out of range", "empty", "unknown name", "missing file",
              "malformed jsonl", "corrupt checkpoint", "not utf-8", "duplicate key"}


def test_the_table():
    assert len(CASES) == N_CASES, f"{len(CASES)} cases; update N_CASES (and docs/RELIABILITY.md)"
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
    assert {c.category for c in CASES} == CATEGORIES
    counts = {cat: sum(c.category == cat for c in CASES) for cat in CATEGORIES}
    assert min(counts.values()) >= 3, counts


def snapshot(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.is_dir(), None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns))
            for p in sorted(root.rglob("*"))}


def children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, capsys, monkeypatch):
    import ray

    def sub(s: str) -> str:
        return s.replace("{T}", str(tmp_path))

    for rel, text in case.files.items():
        (tmp_path / rel).write_text(sub(text))
    if case.prep:
        case.prep(tmp_path)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    before, procs = snapshot(tmp_path), children()
    with pytest.raises(SystemExit) as e:
        main([sub(a) for a in case.argv])
        raise SystemExit(0)
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 2, err
    for frag in case.fragments:
        assert sub(frag) in err, (sub(frag), err)
    assert snapshot(tmp_path) == before, "bad input must not write anything"
    assert not ray.is_initialized(), "bad input must not start Ray"
    assert children() <= procs, "bad input must not leave processes behind"
    assert "Traceback" not in err

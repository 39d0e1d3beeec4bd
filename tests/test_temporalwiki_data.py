"""TemporalWiki at its real size (trainables/twread.py, twdata.py): generated diff sets in the published format, the
cache (built once, reused, whole or absent), the TAALM release's filter and truncation counted, formats agreeing, peak
memory bounded by the batch rather than the file, a run killed mid-period resuming to the numbers of an uninterrupted
one, and bad files named with their row."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainables.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.temporalwiki_generate import generate  # noqa: E402

EXAMPLE = ROOT / "examples" / "temporalwiki_tiny.yaml"


@pytest.fixture(scope="session")
def generated(tmp_path_factory):
    """The 100k-row diff set (and a 3k one) in TWiki-Diffsets' CSV format, generated once per session, seeded."""
    d = tmp_path_factory.mktemp("twgen")
    return {"100k": generate(d / "diff_100k.csv", 100_000, seed=0), "3k": generate(d / "diff_3k.csv", 3_000, seed=0)}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAALM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "temporalwiki" / "diff"


@pytest.fixture(scope="module")
def tokenizer():
    from trainables.config import ModelConfig
    from trainables.models import load_tokenizer

    return load_tokenizer(ModelConfig())


def _prepare(path, tok, **kw):
    from trainables import twdata

    opts = dict(text_column="text", max_length=64, long_docs="truncate", filter="none", sample=None, where="test")
    return twdata.prepare_diff(Path(path), tok, **(opts | kw))


def _ids(ds):
    return [d.input_ids for d in ds.take(range(len(ds)))]


def test_the_taalm_filter_and_truncation_are_counted(generated, cache, tokenizer):
    """The release's filter (preprocess_temporalwiki_dataset.py, re-implemented here row by row with the csv module)
    drops the same rows; every kept document longer than max_length is truncated, its cut counted."""
    kept, cut, truncated = [], 0, 0
    with open(generated["3k"], newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for line in reader:
            content = line[0].strip()
            if ("nan" in content and len(content) < 50) or len(line[0]) < 50 \
                    or len(re.findall(r"[a-zA-Z]", line[0])) / len(line[0]) < 0.3:
                continue
            kept.append(content)
    for ids in tokenizer(kept, add_special_tokens=True)["input_ids"]:
        truncated += len(ids) > 64
        cut += max(0, len(ids) - 64)
    ds = _prepare(generated["3k"], tokenizer, filter="taalm")
    s = ds.stats()
    assert (s["n_rows"], s["n_kept"], s["n_filtered"]) == (3000, len(kept), 3000 - len(kept))
    assert s["n_filtered"] > 0 and (s["n_truncated"], s["tokens_cut"]) == (truncated, cut)
    assert _ids(ds)[:5] == [x[:64] for x in tokenizer(kept[:5], add_special_tokens=True)["input_ids"]]
    chunked = _prepare(generated["3k"], tokenizer, filter="taalm", long_docs="chunk").stats()
    assert chunked["n_docs"] == len(kept) and chunked["n_sequences"] > len(kept)
    assert chunked["tokens"] + chunked["tokens_cut"] == s["tokens"] + s["tokens_cut"]  # every token kept or counted


def test_csv_jsonl_and_parquet_give_the_same_documents(tmp_path, cache, tokenizer):
    paths = [generate(tmp_path / f"d.{ext}", 300, seed=3) for ext in ("csv", "jsonl", "parquet")]
    ids = [_ids(_prepare(p, tokenizer)) for p in paths]
    assert len(ids[0]) > 250 and ids[0] == ids[1] == ids[2]


def test_the_cache_is_built_once_and_reused(generated, cache, tokenizer, monkeypatch):
    from trainables import twdata

    first = _prepare(generated["3k"], tokenizer, sample=(5, 64))
    assert first.stats()["cache"] == "built" and len(first) == 64
    monkeypatch.setattr(twdata, "_tokenize", lambda *a, **k: pytest.fail("the second run tokenized"))
    again = _prepare(generated["3k"], tokenizer, sample=(5, 64))
    assert again.stats()["cache"] == "reused" and _ids(again) == _ids(first)
    # the draw and order of the former in-memory subsample: random.Random(seed).sample of the kept rows
    with open(generated["3k"], newline="") as f:
        rows = [r[0] for r in list(csv.reader(f))[1:] if r[0].strip()]
    picked = [rows[i] for i in __import__("random").Random(5).sample(range(len(rows)), 64)]
    assert _ids(first) == [x[:64] for x in tokenizer(picked, add_special_tokens=True)["input_ids"]]
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [first.entry.name]
    import datasets  # offline, its own cache under TAALM_CACHE

    assert datasets.config.HF_HUB_OFFLINE and cache.parent in Path(datasets.config.HF_DATASETS_CACHE).parents


KILLED_BUILDER = """
import os, signal, sys
from pathlib import Path
from trainables import twdata
from trainables.config import ModelConfig
from trainables.models import load_tokenizer

def killed(path, tokenizer, out, *a):  # the build has begun writing into its temporary directory
    (Path(out) / "tokens.arrow").write_bytes(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)

twdata._build = killed
twdata.prepare_diff(Path(sys.argv[1]), load_tokenizer(ModelConfig()), text_column="text", max_length=64,
                    long_docs="truncate", filter="none", sample=(5, 64), where="test")
"""


def test_a_builder_killed_mid_build_leaves_no_entry_and_the_next_build_clears_its_remains(generated, cache,
                                                                                            tokenizer):
    """A trial SIGKILLed while it builds a period's cache entry: no entry appears (nothing half-cached), and the next
    builder of that entry removes the killed one's temporary directory before building the entry whole."""
    import os

    r = subprocess.run([sys.executable, "-c", KILLED_BUILDER, str(generated["3k"])], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "TAALM_CACHE": str(cache.parent.parent)})
    assert r.returncode == -9, r.stderr[-2000:]
    left = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(left) == 1 and ".tmp" in left[0], left  # the killed builder's remains, and no entry
    built = _prepare(generated["3k"], tokenizer, sample=(5, 64))
    assert built.stats()["cache"] == "built" and len(built) == 64
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [built.entry.name]


def _trial(diff: Path, cache_dir: Path, out: Path) -> dict:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "temporalwiki_data.py"), "trial", "--diff", str(diff),
                        "--max-docs", "64", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                       env={**__import__("os").environ, "TAALM_CACHE": str(cache_dir)})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_peak_memory_is_bounded_by_the_batch_not_the_diff_set(generated, tmp_path):
    """One period with max_docs_per_period=64, each in a fresh process with an empty cache: over the 100k-row diff set
    the peak RSS is within 1.3x of the same run over 3k rows (the file is streamed, never held)."""
    small = _trial(generated["3k"], tmp_path / "c3k", tmp_path / "o3k")
    large = _trial(generated["100k"], tmp_path / "c100k", tmp_path / "o100k")
    assert small["n_docs"] == large["n_docs"] == 64 and small["cache"] == large["cache"] == "built"
    assert large["peak_rss"] <= 1.3 * small["peak_rss"], (large["peak_rss"], small["peak_rss"])


def _cfg(tmp_path, *overrides):
    from trainables.config import load_config
    from trainables.temporalwiki import TemporalWikiConfig, resolve_paths

    a, b = (generate(tmp_path / f"{n}.jsonl", 400, seed=s) for n, s in (("0910", 1), ("1011", 2)))
    return resolve_paths(load_config(EXAMPLE, [
        f'temporalwiki.periods=[{{name: "0910", diff: "{a}"}}, {{name: "1011", diff: "{b}"}}]',
        "temporalwiki.max_docs_per_period=16", "temporalwiki.checkpoint_every_steps=2", "params.kind=lora",
        "params.r=4", "params.dropout=0.2", "replay.kind=mix_review", f"replay.pool={ROOT}/tests/fixtures/temporalwiki/"
        "records.jsonl", *overrides], schema=TemporalWikiConfig), EXAMPLE.parent)


def test_a_run_killed_mid_period_resumes_to_the_same_numbers(tmp_path, cache):
    """Killed after step 2 of the second period's 4 (checkpoints every 2 steps): resumed, it restarts at step 2 of
    that period, and every number equals the run straight through (θ, optimizer, RNG and the position are
    checkpointed; LoRA dropout and Mix-review draw random numbers)."""
    from trainables.loop import Callback
    from trainables.temporalwiki import temporalwiki_run

    full = temporalwiki_run(_cfg(tmp_path), out_dir=tmp_path / "full")
    assert [p["n_docs"] for p in full["periods"]] == [16, 16]
    assert full["periods"][0]["max_docs_per_period"] == full["config"]["temporalwiki"]["max_docs_per_period"] == 16

    class Kill(Callback):
        def on_step(self, unit, step, n_steps, loss):
            if (unit, step) == (1, 2):
                raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        temporalwiki_run(_cfg(tmp_path), out_dir=tmp_path / "resumed", callbacks=[Kill()])

    class Seen(Callback):
        info, steps = None, []

        def on_start(self, info):
            Seen.info = info

        def on_step(self, unit, step, n_steps, loss):
            Seen.steps.append((unit, step))

    resumed = temporalwiki_run(_cfg(tmp_path), out_dir=tmp_path / "resumed", callbacks=[Seen()])
    assert Seen.info["resumed_from"] == 0 and Seen.steps == [(1, 2), (1, 3)]
    strip = [{k: v for k, v in p.items() if k != "data"} for p in full["periods"]]
    assert [{k: v for k, v in p.items() if k != "data"} for p in resumed["periods"]] == strip
    assert all(p["data"]["cache"] == "reused" for p in resumed["periods"])


def _bad_files(d: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (d / "nocol.csv").write_text("body\n" + "A row of text long enough to be kept by any filter at all.\n" * 3)
    (d / "empty.jsonl").write_text("")
    (d / "latin1.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "caf\xe9"}\n')
    (d / "notjson.jsonl").write_text('{"text": "fine"}\n{"text": fine}\n')
    pq.write_table(pa.table({"text": ["x" * 80] * 2000}), d / "full.parquet", row_group_size=500)
    raw = (d / "full.parquet").read_bytes()
    (d / "cut.parquet").write_bytes(raw[:len(raw) * 2 // 3])
    return {"nocol.csv": (r"nocol\.csv:1", "no column 'text'"), "empty.jsonl": (r"empty\.jsonl", "empty"),
            "latin1.jsonl": (r"latin1\.jsonl:3", "not UTF-8"), "notjson.jsonl": (r"notjson\.jsonl:2", "malformed JSON"),
            "cut.parquet": (r"cut\.parquet", "not a readable Parquet file")}


def test_bad_files_name_the_file_and_row_and_cache_nothing(tmp_path, cache, tokenizer):
    cases = _bad_files(tmp_path)
    for name, (where, what) in cases.items():
        with pytest.raises(InputError) as e:
            _prepare(tmp_path / name, tokenizer, sample=(0, 8))
        assert re.search(where, e.value.where) and what in e.value.message, (name, str(e.value))
    assert not cache.exists() or [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_a_bad_diff_set_exits_2_naming_it(tmp_path):
    _bad_files(tmp_path)
    cfg = tmp_path / "tw.yaml"
    text = EXAMPLE.read_text().replace("../tests/fixtures/temporalwiki/1011.jsonl", str(tmp_path / "notjson.jsonl"))
    cfg.write_text(text.replace("../tests/fixtures/", f"{ROOT}/tests/fixtures/"))
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "temporalwiki", str(cfg), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT,
                       env={**__import__("os").environ, "TAALM_CACHE": str(tmp_path / "c")})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "notjson.jsonl:2" in r.stdout + r.stderr and not (tmp_path / "o" / "metrics.json").exists()


def test_probes_in_csv(tmp_path, tokenizer):
    from trainables.temporalwiki import load_probes

    p = tmp_path / "probes.csv"
    p.write_text("subject,relation,object\nLyon,country,France\n\"Santiago, Chile\",capital of,Chile\n")
    probes = load_probes(p, tokenizer, None, 0, "test")
    assert len(probes) == 2 and all(pr.positions for pr in probes)
    p.write_text("subject,relation,object\nLyon,country,\n")
    with pytest.raises(InputError, match=r"probes\.csv:2"):
        load_probes(p, tokenizer, None, 0, "test")

"""LAMA-CKL loading, validation errors with file:line, and the split."""

import json
import shutil

import pytest

from trainables.data import DEFAULT_LAMA_DIR, LAMA_FILES, load_lama, load_split_file, make_split, release_scores
from trainables.errors import InputError


@pytest.fixture(scope="module")
def lama():
    return load_lama()


def test_shipped_data_loads(lama):
    assert {k: len(v) for k, v in lama.facts.items()} == {
        "variant": 500, "invariant_descriptive": 500, "invariant_schematic": 500}
    assert len(lama.hash) == 16
    # the two invariant files share some facts: all_facts holds each uuid once
    uuids = [f.uuid for f in lama.all_facts()]
    assert len(uuids) == len(set(uuids))


def _copy(tmp_path):
    d = tmp_path / "lama"
    shutil.copytree(DEFAULT_LAMA_DIR, d)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


def _replace_line(path, lineno, text):
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_malformed_json_line_names_file_and_line(tmp_path):
    d = _copy(tmp_path)
    _replace_line(d / "variant.jsonl", 7, '{"uuid": "x", ')
    with pytest.raises(InputError) as e:
        load_lama(d)
    assert e.value.where == f"{d / 'variant.jsonl'}:7"
    assert "malformed JSON" in e.value.message


def test_missing_field_names_file_line_and_field(tmp_path):
    d = _copy(tmp_path)
    p = d / "invariant_schematic.jsonl"
    rec = json.loads(p.read_text().splitlines()[41])
    del rec["evidence"]
    _replace_line(p, 42, json.dumps(rec))
    with pytest.raises(InputError) as e:
        load_lama(d)
    assert e.value.where == f"{p}:42"
    assert "'evidence'" in e.value.message and "missing" in e.value.message


def test_wrong_type_and_empty_object(tmp_path):
    d = _copy(tmp_path)
    p = d / "variant.jsonl"
    rec = json.loads(p.read_text().splitlines()[0])
    rec["object"] = "  "
    _replace_line(p, 1, json.dumps(rec))
    with pytest.raises(InputError, match="'object'"):
        load_lama(d)
    rec["object"] = ["Brazil"]
    _replace_line(p, 1, json.dumps(rec))
    with pytest.raises(InputError, match=r"variant.jsonl:1"):
        load_lama(d)


def test_missing_file_and_dir(tmp_path):
    d = _copy(tmp_path)
    (d / LAMA_FILES[1]).unlink()
    with pytest.raises(InputError, match="data file not found"):
        load_lama(d)
    with pytest.raises(InputError, match="not found"):
        load_lama(tmp_path / "nope")


def test_split_rules_and_disjointness(lama):
    scores = release_scores(lama, "descriptive", "llama_7b")
    s = make_split(lama, scores, "descriptive", "release")
    tl, ntf, pool = ({f.uuid for f in x} for x in (s.to_learn, s.ntf, s.ta_pool))
    assert tl and ntf and pool
    assert not (tl & ntf) and not (tl & pool) and not (ntf & pool)
    assert all(f.source == "variant" and scores[f.uuid] == 0 for f in s.to_learn)
    assert all(f.source == "invariant_descriptive" and scores[f.uuid] == 1 for f in s.ntf)
    assert all(scores[f.uuid] < 0.5 for f in s.ta_pool)


def test_crafted_scores_split(lama):
    v = lama.facts["variant"]
    inv = lama.facts["invariant_descriptive"]
    scores = {f.uuid: 1.0 for f in lama.all_facts()}
    scores.update({v[0].uuid: 0.0, v[1].uuid: 0.25, v[2].uuid: 0.5, inv[0].uuid: 0.0})
    s = make_split(lama, scores, "descriptive", "crafted")
    assert [f.uuid for f in s.to_learn] == [v[0].uuid]
    assert {f.uuid for f in s.ta_pool} == {v[1].uuid, inv[0].uuid}  # 0.5 is not < 0.5
    assert v[2].uuid not in {f.uuid for f in s.ntf}  # variant facts are never NOT-TO-FORGET
    assert len(s.ntf) == sum(1 for f in inv if scores[f.uuid] == 1.0)


def test_seeded_subsampling(lama):
    scores = release_scores(lama, "descriptive", "llama_7b")
    a = make_split(lama, scores, "descriptive", "r", to_learn_size=10, ntf_size=5, seed=3)
    b = make_split(lama, scores, "descriptive", "r", to_learn_size=10, ntf_size=5, seed=3)
    c = make_split(lama, scores, "descriptive", "r", to_learn_size=10, ntf_size=5, seed=4)
    assert [f.uuid for f in a.to_learn] == [f.uuid for f in b.to_learn]
    assert [f.uuid for f in a.to_learn] != [f.uuid for f in c.to_learn]
    assert len(a.to_learn) == 10 and len(a.ntf) == 5


def test_split_file_roundtrip_and_errors(lama, tmp_path):
    scores = release_scores(lama, "descriptive", "llama_7b")
    s = make_split(lama, scores, "descriptive", "r", to_learn_size=4, ntf_size=3)
    p = tmp_path / "split.json"
    p.write_text(json.dumps(s.to_json()))
    back = load_split_file(lama, p)
    assert [f.uuid for f in back.to_learn] == [f.uuid for f in s.to_learn]
    p.write_text(json.dumps(dict(s.to_json(), ntf=["not-a-uuid"])))
    with pytest.raises(InputError, match="not-a-uuid"):
        load_split_file(lama, p)


def test_a_cache_entry_is_built_once_when_processes_ask_at_once(tmp_path):
    """The first trials of a study start together and all need the dequantized model and the tailored scores:
    one builds the cache entry, the others wait for it (before: each built its own copy, on the same cores)."""
    import threading
    import time

    from trainables.models import _atomic_build

    calls = []

    def build(d):
        calls.append(1)
        time.sleep(0.5)
        (d / "weights").write_text("w")

    target = tmp_path / "models" / "m"
    threads = [threading.Thread(target=_atomic_build, args=(target, build)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (target / "weights").read_text() == "w" and (target / ".complete").is_file()
    assert [p.name for p in target.parent.iterdir() if ".tmp" in p.name] == []  # no half-built sibling left


def test_the_shipped_smollm2_scores_cover_the_shipped_data():
    """The scores shipped for the embedded model are keyed like the cache (model key, data hash, task), cover
    every fact once with a probe accuracy, and give the documented tailored split (475 / 132 / 664)."""
    from trainables.config import load_config
    from trainables.tailor import SHIPPED_SCORES, scores_cache_path, shipped_scores_file

    lama = load_lama()
    cfg = load_config(DEFAULT_LAMA_DIR.parents[1] / "examples" / "run_smollm2_mini.yaml")  # the demo's model and task
    path = shipped_scores_file(cfg.model, lama, cfg.data.task)
    assert path is not None and path.parent == SHIPPED_SCORES
    assert path.name == scores_cache_path(cfg.model, lama, cfg.data.task).name  # it seeds exactly that cache entry
    rec = json.loads(path.read_text())
    assert rec["model"] == "smollm2-135m" and rec["task"] == "descriptive" and rec["data_hash"] == lama.hash
    assert rec["produced_by"]["function"].startswith("trainables.tailor.score_facts")
    assert set(rec["scores"]) == {f.uuid for f in lama.all_facts()} and rec["n_facts"] == len(rec["scores"])
    assert all(0.0 <= v <= 1.0 for v in rec["scores"].values())
    assert len(rec["check"]["uuids"]) == 8 and set(rec["check"]["uuids"]) <= set(rec["scores"])
    sizes = make_split(lama, rec["scores"], "descriptive", "shipped").summary()
    assert (sizes["to_learn"], sizes["ntf"], sizes["ta_pool"]) == (475, 132, 664)
    assert path.stat().st_size < 100_000


def _small_lama(tmp_path, n=12):
    d = tmp_path / "lama_small"
    d.mkdir()
    for name in LAMA_FILES:
        lines = (DEFAULT_LAMA_DIR / name).read_text().splitlines()[:n]
        (d / name).write_text("\n".join(lines) + "\n")
    return load_lama(d)


def test_a_missing_score_cache_entry_is_seeded_from_a_shipped_file_only_when_the_model_agrees(
        tmp_path, monkeypatch, caplog):
    """A shipped score file seeds the cache (no fact is scored) when the model in hand computes the logits it
    records; with other recorded logits, or another data hash, the facts are scored as before."""
    import torch

    from trainables import tailor
    from trainables.config import ModelConfig
    from trainables.theta import build_theta

    lama = _small_lama(tmp_path)
    cfg = ModelConfig(name="tiny")
    theta = build_theta(cfg, None, torch.device("cpu"))
    truth = tailor.score_facts(theta.model, theta.tokenizer, lama, "descriptive")
    scored = []
    real_score_facts = tailor.score_facts
    monkeypatch.setattr(tailor, "score_facts", lambda *a, **k: scored.append(1) or real_score_facts(*a, **k))
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(tailor, "SHIPPED_SCORES", shipped)
    uuids = sorted(truth)[:4]
    # distinguishable from what the model computes, so that we can tell where the cache entry came from
    marked = {u: 1.0 - v for u, v in truth.items()}
    rec = {"format": tailor.SHIPPED_FORMAT, "model": "tiny", "model_key": tailor.model_key(cfg),
           "data_hash": lama.hash, "task": "descriptive", "n_facts": len(marked),
           "check": {"uuids": uuids, **tailor.logit_check(theta.model, theta.tokenizer, lama, "descriptive", uuids)},
           "scores": marked}
    target = shipped / f"{tailor.scores_key(cfg, lama, 'descriptive')}.json"

    def fresh_cache(name, record):
        monkeypatch.setenv("TAALM_CACHE", str(tmp_path / name))
        target.write_text(json.dumps(record))
        got = tailor.cached_scores(cfg, lama, "descriptive", lambda: theta.model, theta.tokenizer)
        entry = json.loads(tailor.scores_cache_path(cfg, lama, "descriptive").read_text())
        assert entry["scores"] == got
        return got, entry["origin"]

    assert fresh_cache("c1", rec) == (marked, f"shipped: shipped/{target.name}") and scored == []
    # cached now: the shipped file is not read again
    target.unlink()
    assert tailor.cached_scores(cfg, lama, "descriptive", lambda: theta.model, theta.tokenizer) == marked
    # recorded logits of other weights: scored
    other = dict(rec, check=dict(rec["check"], sum=rec["check"]["sum"] * 1.01 + 1.0))
    with caplog.at_level("WARNING", logger="trainables.tailor"):
        assert fresh_cache("c2", other) == (truth, "computed") and scored == [1]
    assert "does not compute the logits recorded" in caplog.text
    # another data hash, or a file that does not cover every fact: not used, scored
    assert fresh_cache("c3", dict(rec, data_hash="0" * 16)) == (truth, "computed") and scored == [1, 1]
    assert fresh_cache("c4", dict(rec, scores=dict(list(marked.items())[1:]))) == (truth, "computed")
    assert len(scored) == 3
    # another model (another init seed: another model key) is not looked up under this file's name
    assert tailor.scores_key(ModelConfig(name="tiny", init_seed=1), lama, "descriptive") != target.stem

"""The documents' figures against the files they cite (issue 30 item 6): each figure below is computed from the
committed JSON a document names and must appear in that document as printed, so a re-run that changes a JSON (or an
edit that changes a figure) fails here until both agree. Covered: the performance figures (throughput, the profile's
shares, the peak-bound), the storage and TemporalWiki tables, the bad-input table's counts, RUNTIME_GB."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = (ROOT / "docs" / "RESULTS.md").read_text()
RELIABILITY = (ROOT / "docs" / "RELIABILITY.md").read_text()
README = (ROOT / "README.md").read_text()


def bench(name: str) -> dict:
    return json.loads((ROOT / "bench" / "results" / name).read_text())


def section(text: str, heading: str) -> str:
    """The text of the section that starts at ``heading`` up to the next heading of the same or a higher level."""
    start = text.index(heading)
    level = len(heading) - len(heading.lstrip("#")) or 6  # a paragraph's first words: up to the next heading
    nxt = re.compile(r"^#{1,%d} " % level, re.M).search(text, start + len(heading))
    return text[start:nxt.start() if nxt else len(text)]


def expect(text: str, *figures: str) -> None:
    missing = [f for f in figures if f not in text]
    assert not missing, f"not in the document as the JSON gives them: {missing}"


def test_throughput_and_the_peak_bound():
    d = bench("throughput.json")
    r = {x["case"]: x for x in d["results"]}
    tps = {k: v["tokens_per_second"] for k, v in r.items()}
    expect(RESULTS, f"tiny/full {tps['tiny/full']:.0f}", f"tiny/LoRA {tps['tiny/lora']:.0f}",
           f"**SmolLM2/LoRA {tps['smollm2-135m/lora']:.1f}**", f"SmolLM2/full {tps['smollm2-135m/full']:.1f}")
    sdpa = {x["case"]: x["tokens_per_second"] for x in bench("throughput_sdpa.json")["results"]}
    expect(RESULTS, f"{sdpa['smollm2-135m/lora']:.1f} and {sdpa['smollm2-135m/full']:.1f}")
    peak = d["peak_flops"]["measured_matmul"]
    lora = r["smollm2-135m/lora"]
    expect(RESULTS, f"at {peak / 1e9:.0f} GFLOP/s", f"**{peak / lora['flops']['per_token']:.0f} tokens/s**",
           f"{peak / 1e9:.1f} GFLOP/s ÷ {lora['flops']['per_token'] / 1e6:.1f} MFLOP per token",
           f"**{lora['fraction_of_measured_peak'] * 100:.0f} %**")
    head = 4 * 49152 * 576  # the LM head's multiplying parameters, forward + backward, per token (the JSON's formula)
    expect(RESULTS, f"≈ {head / lora['flops']['per_token'] * 100:.0f} % of a position's FLOPs")


def test_the_profiles_shares():
    p = bench("profile_step.json")
    g = p["groups_share"]
    expect(RESULTS, f"gives {p['tokens_per_second_at_peak']:.0f}")
    rows = {"matmul": "matmul (", "norm and activations": "norms and activations",
            "copies and layout": "copies and layout", "loss (log-softmax over the vocabulary)": "loss (log-softmax",
            "other": "| other |", "attention (softmax, masks)": "attention softmax and masks", "optimizer": "optimizer ("}
    table = section(RESULTS, "**Re-run 2026-11-30")
    for key, label in rows.items():
        line = next(x for x in table.splitlines() if x.startswith("|") and label in x)
        assert line.rstrip().endswith(f"| {g[key] * 100:.1f} % |"), (key, line, g[key])
    mm = next(o for o in p["top_ops"] if o["op"] == "aten::mm")
    expect(table, f"{mm['calls']:,} calls = {mm['calls'] // p['steps']:,} per step",
           f"1,260 of the {mm['calls'] // p['steps']:,}", f"the other {mm['calls'] // p['steps'] - 1260:,})")


def test_the_storage_table():
    d = bench("storage.json")
    s = section(RESULTS, "## Storage")
    for case, label, digits in (("tiny", "`tiny` (0.1 MB)", 3), ("smollm2-135m LoRA r16", "(56 MB)", 2)):
        c = d["per_checkpoint"][case]
        line = next(x for x in s.splitlines() if label in x)
        assert f"| {c['local_dir_s']['median']:.{digits}f} s | {c['s3_loopback_s']['median']:.{digits}f} s | " \
               f"{c['s3_over_local_median']:.2f}× |" in line, (line, c)
    st = d["per_study"]
    expect(s, f"{st['study_local_dir_s']['median']:.1f} s (min {st['study_local_dir_s']['min']:.1f}, "
              f"max {st['study_local_dir_s']['max']:.1f})",
           f"{st['s3_minus_local_per_epoch_s']['median']:.1f} s (min {st['s3_minus_local_per_epoch_s']['min']:.1f}")
    cl = d["per_trial_on_a_cluster"]
    expect(s, f"{cl['namespace_cluster_s3_s']['median']:.1f} s vs {cl['one_machine_local_ray_s']['median']:.1f} s",
           f"{cl['cluster_minus_one_machine_per_trial_s']:.1f} s per trial")


def test_the_temporalwiki_table():
    d = bench("temporalwiki_data.json")
    s = section(RESULTS, "### TemporalWiki data at real size")
    gb = 2 ** 30
    for n, label in (("10000", "| 10 k ("), ("100000", "| 100 k ("), ("1000000", "| 1 M (")):
        m = d["sizes"][n]["summary"]
        line = next(x for x in s.splitlines() if x.startswith(label))
        cold, warm = m["trial_cold.peak_rss"]["median"] / gb, m["trial_warm.peak_rss"]["median"] / gb
        assert f"| {cold:.2f} / {warm:.2f} GB |" in line, (line, cold, warm)
        ts = m["trial_cold.seconds"]
        assert f"| {ts['median']:.0f} ({ts['min']:.0f}–{ts['max']:.0f}) /" in line, (line, ts)
        if "tokenize.docs_per_s" in m:
            t = m["tokenize.docs_per_s"]
            assert f"| {t['median']:.0f} ({t['min']:.0f}–{t['max']:.0f}) |" in line, (line, t)


def test_the_bad_input_table_counts_the_cases():
    from test_bad_input import CASES, N_CASES

    counts = Counter(c.category for c in CASES)
    names = {"YAML syntax": "yaml syntax", "unknown keys": "unknown key", "wrong types": "wrong type",
             "out-of-range values": "out of range", "empty axes / collections": "empty",
             "unknown names": "unknown name", "missing files": "missing file",
             "malformed JSON lines": "malformed jsonl", "corrupt checkpoints": "corrupt checkpoint",
             "not UTF-8": "not utf-8", "duplicate YAML keys": "duplicate key"}
    table = section(RELIABILITY, "## 4. Bad input")
    doc = {}
    for line in table.splitlines():
        m = re.match(r"\| ([^|]+?) \| (\d+) \|", line)
        if m:
            doc[names[m.group(1)]] = int(m.group(2))
    assert doc == dict(counts), (doc, dict(counts))
    assert sum(doc.values()) == N_CASES
    expect(table, f"**{N_CASES} cases**")


def test_runtime_gb_is_the_benchs_measurement():
    from orchestrator.memory import RUNTIME_GB

    measured = bench("memory_estimate.json")["cases"]["ray_runtime"]["peak_rss_gb"]
    assert RUNTIME_GB == pytest.approx(measured, abs=0.005), (RUNTIME_GB, measured)


def test_the_claims_about_taalm_name_their_intervals():
    """README's and RESULTS' TAALM-vs-Finetune claims are the paired intervals of the committed re-run's report."""
    import csv

    path = ROOT / "docs" / "artifacts" / "lama_ckl_3seeds" / "core_rerun_epochs3_paired.csv"
    row = next(r for r in csv.DictReader(path.open()) if r["method"] == "TAALM" and r["baseline"] == "Finetune")

    def interval(key: str) -> str:
        sign = lambda x: f"{float(x):+.4f}".replace("-", "−")  # noqa: E731
        return f"{sign(row[key])} [{sign(row[key + '_lo'])}, {sign(row[key + '_hi'])}]"

    for key in ("d_top_acc", "d_total_knowledge", "d_nf_acc", "d_nf_acc_at_epoch"):
        expect(README, interval(key))
    expect(RESULTS, "Δ Top Acc **" + interval("d_top_acc") + "**", "Δ Total\nKnowledge **" + interval("d_total_knowledge"),
           "Δ NF Acc at each method's Top-Acc epoch " + interval("d_nf_acc").split(" [")[0])

"""The report's paired intervals (orchestrator/report.py: paired_differences) stand alone and say what they cover:
a method's interval is a function of its own trials, its baseline's and the seed (never of the other rows of the
report); Δ NF Acc has its interval beside Δ Top Acc and Δ Total Knowledge (NF Acc at each method's own Top-Acc
epoch, and optionally at one epoch for both); and the intervals cover a known difference about 95 % of the time
(a fast version of bench/bootstrap_coverage.py)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from orchestrator.report import fact_resample, paired_differences, rows_from_per_fact, seed_resample
from orchestrator.report_files import paired_markdown

ROOT = Path(__file__).resolve().parents[1]


def _row(label, seed, tl, nf, uuids=("t", "n")):
    n_tl, n_nf = len(tl[0]), len(nf[0])
    return {"label": label, "seed": seed, "status": "FINISHED", "per_fact": {
        "epochs": list(range(len(tl))), "to_learn_uuids": [f"{uuids[0]}{i}" for i in range(n_tl)],
        "ntf_uuids": [f"{uuids[1]}{i}" for i in range(n_nf)], "to_learn": tl, "ntf": nf}}


def _curves(rng, n_tl, n_nf, p_learn, p_keep, epochs=3):
    tl = [[0.0] * n_tl] + [list((rng.random(n_tl) < p_learn).astype(float)) for _ in range(epochs)]
    nf = [[1.0] * n_nf] + [list((rng.random(n_nf) < p_keep).astype(float)) for _ in range(epochs)]
    return tl, nf


def _grid(rng, methods, seeds=(0, 1, 2), n=32):
    rows = []
    for label, p_learn, p_keep in methods:
        for s in seeds:
            rows.append(_row(label, s, *_curves(rng, n, n, p_learn, p_keep)))
    return rows


METHODS = [("Finetune", 0.05, 0.8), ("TAALM", 0.3, 0.9), ("Oracle", 0.5, 0.7), ("Random", 0.05, 0.8),
           ("K-Adapter", 0.0, 0.95)]


def test_adding_or_removing_a_row_leaves_every_other_interval_unchanged():
    """The Table 1 re-run's intervals moved by up to 0.018 with every number identical: one generator drew every
    method's resamples in row order. Now each (method, baseline) pair's resamples are drawn from its facts, its
    seeds and the seed alone: every other row's interval is identical to the last digit."""
    rows = _grid(np.random.default_rng(0), METHODS)
    full = {d["method"]: d for d in paired_differences(rows, n_boot=400)}
    assert sorted(full) == ["K-Adapter", "Oracle", "Random", "TAALM"]
    without = [r for r in rows if r["label"] != "Oracle"]  # a row removed
    extra = _grid(np.random.default_rng(9), [("New method", 0.2, 0.6)]) + rows  # a row added, first in order
    for variant in (without, extra, list(reversed(rows))):
        for d in paired_differences(variant, baseline="Finetune", n_boot=400):
            if d["method"] in full:
                assert d == full[d["method"]], d["method"]


def test_the_same_facts_resample_alike_for_every_method_and_seed():
    """Facts shared by methods and by seeds (a grid trains every seed on the same facts) are resampled alike:
    facts and seeds crossed; other facts (another data seed) are resampled independently."""
    a = fact_resample([f"t{i}" for i in range(16)], 50, 0)
    assert a.shape == (50, 16) and np.allclose(a.sum(axis=1), 1)
    assert np.array_equal(a, fact_resample([f"t{i}" for i in range(16)], 50, 0))
    assert not np.array_equal(a, fact_resample([f"u{i}" for i in range(16)], 50, 0))
    assert not np.array_equal(a, fact_resample([f"t{i}" for i in range(16)], 50, 1))
    assert np.array_equal(seed_resample(["0"], 5, 0), np.zeros((5, 1), dtype=int))
    assert seed_resample(["0", "1", "2"], 7, 0).shape == (7, 3)


def _summary(pf, epoch=None):
    tl = np.array(pf["to_learn"])[1:].mean(1)
    nf = np.array(pf["ntf"])[1:].mean(1)
    e = int(tl.argmax())
    return tl[e], nf[e], tl[e] + nf[e], (nf[epoch - 1] if epoch else None)


def test_nf_acc_has_its_interval_at_the_top_acc_epoch_and_at_a_fixed_epoch():
    rng = np.random.default_rng(3)
    rows = _grid(rng, [("Finetune", 0.05, 0.6), ("TAALM", 0.4, 0.95)], n=48)
    d = paired_differences(rows, n_boot=500, nf_epoch=2)[0]
    by = {(r["label"], r["seed"]): r["per_fact"] for r in rows}
    diffs = np.array([np.subtract(_summary(by[("TAALM", s)], 2)[:4], _summary(by[("Finetune", s)], 2)[:4])
                      for s in (0, 1, 2)], dtype=float)
    for j, name in enumerate(("top_acc", "nf_acc", "total_knowledge", "nf_acc_at_epoch")):
        assert d[f"d_{name}"] == pytest.approx(diffs[:, j].mean())
        assert d[f"d_{name}_lo"] <= d[f"d_{name}"] <= d[f"d_{name}_hi"]
    assert d["nf_epoch"] == 2 and d["d_nf_acc_lo"] > 0  # a method that keeps clearly more
    md = paired_markdown([d])
    assert "| Δ NF Acc | 95 % interval |" in md and "Δ NF Acc at epoch 2" in md and "at each method's own" in md
    assert "Top, NF, Total, NF@2" in md
    # a horizon some seed did not reach: no NF Acc at that epoch, the other differences unchanged
    short = paired_differences(rows, n_boot=500, nf_epoch=7)[0]
    assert "nf_epoch" not in short and "d_nf_acc_at_epoch" not in short
    assert short["d_top_acc_lo"] == d["d_top_acc_lo"] and short["d_nf_acc_hi"] == d["d_nf_acc_hi"]
    assert "n/a" not in paired_markdown([short]) and "at epoch 7" not in paired_markdown([short])


def test_a_report_written_per_fact_file_recomputes_the_intervals(tmp_path):
    """write_report's per_fact.json holds what the paired intervals are computed from: read back, the same rows."""
    import json

    rows = _grid(np.random.default_rng(4), METHODS[:2])
    p = tmp_path / "per_fact.json"
    p.write_text(json.dumps({"format": "taalm-report-per-fact/1",
                             "trials": [{k: r[k] for k in ("label", "seed", "status", "per_fact")} for r in rows]}))
    assert paired_differences(rows_from_per_fact(p), n_boot=300) == paired_differences(rows, n_boot=300)


def _bench():
    spec = importlib.util.spec_from_file_location("bootstrap_coverage", ROOT / "bench" / "bootstrap_coverage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

"""The report's paired comparison: each method against the baseline row, per fact, with a paired
bootstrap interval over facts and seeds (orchestrator.report.paired_differences)."""

import numpy as np
import pytest

from orchestrator.report import paired_differences, paired_markdown


def _row(label, seed, tl, nf):
    """A finished trial with per-fact accuracies: tl / nf are [epochs 0..N][facts]."""
    n_tl, n_nf = len(tl[0]), len(nf[0])
    return {"label": label, "seed": seed, "status": "FINISHED", "per_fact": {
        "epochs": list(range(len(tl))), "to_learn_uuids": [f"t{i}" for i in range(n_tl)],
        "ntf_uuids": [f"n{i}" for i in range(n_nf)], "to_learn": tl, "ntf": nf}}


def _curves(rng, n_tl, n_nf, p_learn, p_keep, epochs=3):
    tl = [[0.0] * n_tl] + [list((rng.random(n_tl) < p_learn).astype(float)) for _ in range(epochs)]
    nf = [[1.0] * n_nf] + [list((rng.random(n_nf) < p_keep).astype(float)) for _ in range(epochs)]
    return tl, nf


def test_point_estimate_is_the_difference_of_the_summaries():
    rng = np.random.default_rng(0)
    rows = []
    for seed in (0, 1, 2):
        rows.append(_row("Finetune", seed, *_curves(rng, 40, 30, 0.1, 0.7)))
        rows.append(_row("TAALM", seed, *_curves(rng, 40, 30, 0.4, 0.9)))
    d = paired_differences(rows, n_boot=500)
    assert [x["method"] for x in d] == ["TAALM"] and d[0]["baseline"] == "Finetune" and d[0]["seeds"] == 3

    def summary(r):  # Top Acc over epochs 1..N, NF Acc at the first epoch reaching it
        tl = np.array(r["per_fact"]["to_learn"])[1:].mean(1)
        nf = np.array(r["per_fact"]["ntf"])[1:].mean(1)
        e = int(tl.argmax())
        return tl[e], tl[e] + nf[e]

    diffs = [np.subtract(summary(rows[2 * i + 1]), summary(rows[2 * i])) for i in range(3)]
    assert d[0]["d_top_acc"] == pytest.approx(np.mean([x[0] for x in diffs]))
    assert d[0]["d_total_knowledge"] == pytest.approx(np.mean([x[1] for x in diffs]))
    assert 0 < d[0]["d_top_acc_lo"] < d[0]["d_top_acc"] < d[0]["d_top_acc_hi"]  # a clear effect excludes 0
    assert "| TAALM | +0." in paired_markdown(d) and "excludes 0" in paired_markdown(d)


def test_a_method_equal_to_the_baseline_has_an_interval_around_zero():
    rng = np.random.default_rng(1)
    rows = []
    for seed in (0, 1):
        tl, nf = _curves(rng, 50, 20, 0.2, 0.8)
        rows += [_row("Finetune", seed, tl, nf), _row("Copy", seed, tl, nf)]
        rows.append(_row("Noise", seed, *_curves(rng, 50, 20, 0.2, 0.8)))
    d = {x["method"]: x for x in paired_differences(rows, n_boot=500)}
    assert d["Copy"]["d_top_acc"] == 0 and d["Copy"]["d_top_acc_lo"] == 0 == d["Copy"]["d_top_acc_hi"]
    assert d["Noise"]["d_top_acc_lo"] < 0 < d["Noise"]["d_top_acc_hi"]  # same distribution: no effect


def test_baseline_choice_pairing_and_missing_data():
    rng = np.random.default_rng(2)
    a, b = _curves(rng, 10, 10, 0.3, 0.8), _curves(rng, 10, 10, 0.3, 0.8)
    rows = [_row("Oracle", 0, *a), _row("Random", 0, *b)]
    assert [x["baseline"] for x in paired_differences(rows, n_boot=50)] == ["Oracle"]  # no Finetune: first row
    assert [x["method"] for x in paired_differences(rows, baseline="Random", n_boot=50)] == ["Oracle"]
    other = _row("Random", 0, *b)
    other["per_fact"]["to_learn_uuids"] = [f"x{i}" for i in range(10)]  # other facts: cannot be paired
    assert paired_differences([rows[0], other], n_boot=50) == []
    failed = dict(rows[1], status="FAILED")
    assert paired_differences([rows[0], failed], n_boot=50) == []


def _study(tmp_path, name, trials):
    """A real MLflow sqlite store with a study's finished trial runs (tags and per_fact.json as the
    tracking callback writes them)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / (name + '.db')}"
    c = MlflowClient(uri)
    exp = c.create_experiment(name, artifact_location=(tmp_path / f"{name}-art").as_uri())
    for order, (label, seed, row) in enumerate(trials):
        run = c.create_run(exp, run_name=f"{label} seed {seed}", tags={
            "taalm.role": "trial", "taalm.label": label, "taalm.seed": str(seed), "taalm.order": str(order)})
        tl = np.array(row["per_fact"]["to_learn"])[1:].mean(1)
        c.log_metric(run.info.run_id, "top_acc", float(tl.max()))
        c.log_dict(run.info.run_id, row["per_fact"], "per_fact.json")
        c.set_terminated(run.info.run_id, "FINISHED")
    return uri


def test_report_joins_studies_and_checks_the_baseline(tmp_path):
    from orchestrator.report import write_report
    from trainables.errors import InputError

    rng = np.random.default_rng(3)
    a = [(lab, 0, _row(lab, 0, *_curves(rng, 20, 10, p, 0.8))) for lab, p in (("Finetune", 0.1), ("TAALM", 0.5))]
    b = [(lab, 1, _row(lab, 1, *_curves(rng, 20, 10, p, 0.8))) for lab, p in (("Finetune", 0.1), ("TAALM", 0.5))]
    ua, ub = _study(tmp_path, "s0", a), _study(tmp_path, "s1", b)
    rep = write_report(ua, "s0", tmp_path / "rep", more=[(ub, "s1")])
    assert [(e["method"], e["seeds"]) for e in rep["table"]] == [("Finetune", 2), ("TAALM", 2)]
    assert rep["paired"][0]["method"] == "TAALM" and rep["paired"][0]["seeds"] == 2
    assert (tmp_path / "rep" / "paired.csv").is_file()
    with pytest.raises(InputError, match="'Nope' is not a method"):
        write_report(ua, "s0", tmp_path / "rep2", baseline="Nope")
    with pytest.raises(InputError, match="Finetune seed 0 is also in study 's0'"):
        write_report(ua, "s0", tmp_path / "rep3", more=[(ua, "s0")])
    assert not (tmp_path / "rep2").exists() and not (tmp_path / "rep3").exists()

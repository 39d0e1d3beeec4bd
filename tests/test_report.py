"""The report's paired comparison: each method against the baseline row, per fact, with a paired
bootstrap interval over facts and seeds (orchestrator.report.paired_differences)."""

import numpy as np
import pytest

from orchestrator.report import paired_differences
from orchestrator.report_files import paired_markdown


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
    from orchestrator.report_files import write_report
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


def _trial(label, seed, tl_curve, n_facts=64, status="FINISHED", per_fact=True):
    """A trial row as collect() returns it, with a hand-made TO-LEARN curve (epoch 0..N)."""
    curves = {"to_learn_acc": dict(enumerate(tl_curve)), "ntf_acc": {e: 0.9 for e in range(len(tl_curve))}}
    pf = {"epochs": list(range(len(tl_curve))), "to_learn_uuids": [f"t{i}" for i in range(n_facts)],
          "ntf_uuids": ["n0"], "to_learn": [[a] * n_facts for a in tl_curve], "ntf": [[0.9]] * len(tl_curve)}
    top = max(tl_curve[1:] or tl_curve)
    return {"label": label, "seed": seed, "status": status, "failure": None, "order": 0, "start": seed,
            "curves": curves, "per_fact": pf if per_fact else None, "n_to_learn": n_facts if not per_fact else None,
            "top_acc": top, "top_epoch": tl_curve.index(top, 1 if len(tl_curve) > 1 else 0), "nf_acc": 0.9, "total_knowledge": top + 0.9,
            "avg_changed_ppl": None, "avg_unchanged_ppl": None}


def test_did_not_learn_is_one_fact_or_less_above_epoch_0():
    from orchestrator.report import learning

    one = 1 / 64
    # never above epoch 0, or at most one fact above it -> did not learn
    assert learning(_trial("A", 0, [0, 0, 0, 0]))["learned"] is False
    assert learning(_trial("A", 0, [0, 0, one, 0]))["learned"] is False
    assert learning(_trial("A", 0, [0, 0, one + 1e-12, 0]))["learned"] is False  # a mean's float noise
    # relative to epoch 0, not to 0: a model that started at 0.5 and stays there learned nothing
    assert learning(_trial("A", 0, [0.5, 0.5, 0.5 + one]))["learned"] is False
    v = learning(_trial("A", 0, [0, 0.01, 2 * one, 0]))
    assert v["learned"] is True and v["gain"] == pytest.approx(2 * one) and v["epochs"] == 3 and v["n_facts"] == 64
    # a fall below epoch 0 is no learning; n_facts from the run's params when per_fact.json is missing
    assert learning(_trial("A", 0, [0.2, 0.1, 0.05], n_facts=8, per_fact=False)) == {
        "gain": pytest.approx(-0.1), "n_facts": 8, "epochs": 2, "learned": False}
    assert learning(_trial("A", 0, [0, 2 / 8], n_facts=8, per_fact=False))["learned"] is True
    # cannot be told: failed, no trained epoch, facts unknown
    assert learning(_trial("A", 0, [0, 0], status="FAILED")) is None
    assert learning(_trial("A", 0, [0])) is None
    unknown = _trial("A", 0, [0, 0], per_fact=False)
    unknown["n_to_learn"] = None
    assert learning(unknown) is None


def test_the_table_marks_rows_that_did_not_learn_and_keeps_the_numbers():
    from orchestrator.report import table
    from orchestrator.report_files import markdown

    one = 1 / 64
    rows = [_trial("Finetune", s, [0, one, 3 * one, 2 * one]) for s in range(3)]
    rows += [_trial("RHO-1 (excess loss)", s, [0, 0, 0, 0]) for s in range(3)]
    rows += [_trial("Mixed", 0, [0, one, 0, 0]), _trial("Mixed", 1, [0, 4 * one, 0, 0]),
             _trial("Mixed", 2, [0, 0, 0, 0], status="FAILED")]
    tab = {e["method"]: e for e in table(rows)}
    assert (tab["Finetune"]["did_not_learn_seeds"], tab["Finetune"]["judged_seeds"]) == (0, 3)
    assert (tab["RHO-1 (excess loss)"]["did_not_learn_seeds"], tab["RHO-1 (excess loss)"]["top_acc"]) == (3, 0.0)
    assert (tab["Mixed"]["did_not_learn_seeds"], tab["Mixed"]["judged_seeds"], tab["Mixed"]["horizon_max"]) == (1, 2, 3)
    md = markdown(list(tab.values()))
    lines = {ln.split(" | ")[0][2:]: ln for ln in md.splitlines() if ln.startswith("| ")}
    assert "did not learn" not in lines["Finetune"]
    assert "| 0.0000 ± 0.0000 — **did not learn within 3 epochs (3/3 seeds)** |" in lines["RHO-1 (excess loss)"]
    assert "did not learn within 3 epochs (1/2 seeds)" in lines["Mixed"]
    assert "1 / TO-LEARN facts" in md  # the rule is stated under the table
    one_seed = markdown(table([_trial("K-Adapter", 0, [0, 0, 0, 0, 0, 0])]))
    assert "**did not learn within 5 epochs**" in one_seed and "seeds)" not in one_seed
    assert "**did not learn within 1 epoch**" in markdown(table([_trial("K-Adapter", 0, [0, 0])]))
    assert "did not learn" not in markdown(table(rows[:3]))  # nothing to say: no rule printed either
    assert "did not learn" not in markdown(table(rows), protocol="temporalwiki")


def test_a_row_of_one_seed_shows_no_spread_and_the_table_says_it_is_not_conclusive():
    """A standard deviation over one seed is not 0, it is not there: the row prints its numbers without "±" and the
    table says which rows have one seed and that comparing them is not conclusive (LAMA-CKL and TemporalWiki)."""
    from orchestrator.report import table
    from orchestrator.report_files import markdown

    one = 1 / 64
    rows = [_trial("Finetune", s, [0, one, 3 * one, 2 * one]) for s in range(3)] + \
        [_trial("TAALM", 0, [0, 4 * one, 5 * one, 5 * one])]
    md = markdown(table(rows))
    lines = {ln.split(" | ")[0][2:]: ln for ln in md.splitlines() if ln.startswith("| ")}
    assert "±" in lines["Finetune"] and "±" not in lines["TAALM"]
    assert f"| {5 * one:.4f} |" in lines["TAALM"]  # its Top Acc, as measured
    assert "One seed for TAALM:" in md and "not conclusive" in md
    assert "One seed" not in markdown(table(rows[:3]))
    tw = markdown(table([_trial("Finetune", 0, [0, one])]), protocol="temporalwiki")
    assert "±" not in [ln for ln in tw.splitlines() if ln.startswith("| Finetune")][0] and "One seed for Finetune" in tw


def test_the_study_run_description_and_files_carry_the_mark(tmp_path):
    """write_report on a real MLflow store: the printed table and the study run's description say "did not
    learn", table.csv keeps Top Acc numeric with the count in a column of its own, trials.parquet per trial."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    from orchestrator.report_files import write_report

    uri = f"sqlite:///{tmp_path / 'st.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("st", artifact_location=(tmp_path / "art").as_uri())
    parent = c.create_run(exp, run_name="st", tags={"taalm.role": "study"}).info.run_id
    one = 1 / 16
    for order, (label, curve) in enumerate([("Finetune", [0, one, 3 * one]), ("RHO-1 (release)", [0, 0, one])]):
        for seed in (0, 1):
            run = c.create_run(exp, run_name=f"{label} {seed}", tags={
                "taalm.role": "trial", "taalm.label": label, "taalm.seed": str(seed), "taalm.order": str(order)})
            rid = run.info.run_id
            c.log_param(rid, "data.to_learn_size", "16")
            for e, a in enumerate(curve):
                c.log_metric(rid, "to_learn_acc", a, step=e)
            for k, v in (("top_acc", max(curve[1:])), ("top_epoch", 1), ("nf_acc", 0.9)):
                c.log_metric(rid, k, v)
            c.set_terminated(rid, "FINISHED")
    rep = write_report(uri, "st", tmp_path / "rep")
    assert "**did not learn within 2 epochs (2/2 seeds)**" in rep["markdown"]
    note = c.get_run(parent).data.tags["mlflow.note.content"]
    assert "RHO-1 (release) | 0.0625 ± 0.0000 — **did not learn within 2 epochs (2/2 seeds)**" in note
    csv = pacsv.read_csv(tmp_path / "rep" / "table.csv").to_pylist()
    assert [(r["method"], r["top_acc"], r["did_not_learn_seeds"]) for r in csv] == [
        ("Finetune", 0.1875, 0), ("RHO-1 (release)", 0.0625, 2)]
    trials = pq.read_table(tmp_path / "rep" / "trials.parquet").to_pylist()
    assert [t["learned"] for t in trials] == [True, True, False, False]

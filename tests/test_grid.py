"""Ablation-grid expansion on crafted specs. (Bad grids: tests/test_bad_input.py.)"""

from pathlib import Path


from orchestrator.grid import GridSpec, expand, load_grid

ROOT = Path(__file__).resolve().parents[1]


def test_product_zip_exclude():
    spec = GridSpec(name="g", axes={"weighting.scheme": ["uniform", "oracle"], "train.lr": [1e-3, 1e-4]},
                    zip=[{"train.epochs": [1, 2, 3], "train.batch_size": [4, 8, 16]}],
                    exclude=[{"weighting.scheme": "oracle", "train.lr": 1e-4}, {"train.epochs": 3}])
    combos = expand(spec)
    # 2 x 2 x 3 = 12, minus oracle+1e-4 (x3 zip rows = 3), minus epochs 3 rows not already removed (3)
    assert len(combos) == 12 - 3 - 3
    assert all((c["train.epochs"], c["train.batch_size"]) in {(1, 4), (2, 8)} for c in combos)
    assert not any(c["weighting.scheme"] == "oracle" and c["train.lr"] == 1e-4 for c in combos)


def test_no_axes_is_one_trial_per_seed(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text(f"name: single\nbase: {ROOT / 'examples' / 'run_tiny.yaml'}\nseeds: [3, 4]\n")
    spec, trials, meta = load_grid(p)
    assert [t.seed for t in trials] == [3, 4] and meta is None
    assert trials[0].config.seed == 3 and trials[0].key != trials[1].key


def test_trials_from_the_smoke_grid():
    spec, trials, meta = load_grid(ROOT / "ablations" / "smoke_tiny.yaml", ["seeds=[0,1]"])
    assert [(t.label, t.seed) for t in trials] == [("Finetune", 0), ("Finetune", 1), ("Oracle", 0), ("Oracle", 1)]
    assert all(t.config.train.epochs == 2 for t in trials)
    assert trials[2].config.weighting.scheme == "oracle"
    assert len({t.key for t in trials}) == 4


def test_table9_grid_expands_with_a_meta_stage():
    spec, trials, meta = load_grid(ROOT / "ablations" / "table9_token_weighting.yaml")
    labels = [t.label for t in trials]
    for name in ("Finetune", "TAALM", "Oracle", "RHO-1 (excess loss)", "Known-mask", "Random", "TAALM + Known-mask"):
        assert name in labels, name
    assert meta is not None and any(t.needs_phi for t in trials)
    # identical data, model and hyper-parameters apart from the weighting
    cfgs = {t.label: t.config.model_dump() for t in trials if t.seed == spec.seeds[0]}
    for c in cfgs.values():
        c["weighting"] = None
    assert len({repr(c) for c in cfgs.values()}) == 1


def test_zip_rows_with_method_names():
    spec, trials, meta = load_grid(ROOT / "ablations" / "baselines_table1.yaml")
    rows = {t.label: t.config for t in trials}
    assert list(rows) == ["Finetune", "K-Adapter", "Mix-review", "RecAdam", "RHO-1 (excess loss)", "RHO-1 (release)",
                          "TAALM"]
    assert rows["K-Adapter"].params.kind == "kadapter" and rows["Mix-review"].replay.kind == "mix_review"
    assert rows["RecAdam"].regularizer.kind == "recadam" and spec.baseline == "Finetune"
    # the two RHO-1 rows differ in their selection only; the excess-loss row is the Table 9 grid's RHO-1 trial
    a, b = rows["RHO-1 (excess loss)"].model_dump(), rows["RHO-1 (release)"].model_dump()
    assert (a["weighting"]["scheme"], a["weighting"]["rho1"]["selection"]) == ("rho1", "excess_loss")
    assert b["weighting"]["rho1"].pop("selection") == "release" and a["weighting"]["rho1"].pop("selection")
    assert a == b
    _, t9, _ = load_grid(ROOT / "ablations" / "table9_token_weighting.yaml", ["overrides.train.epochs=5"])
    t9_rho1 = next(t.config for t in t9 if t.label == "RHO-1 (excess loss)").model_dump()
    t1_rho1 = rows["RHO-1 (excess loss)"].model_dump()
    for c in (t9_rho1, t1_rho1):  # options of the replay and regulariser this row does not use (kind: none)
        assert c["replay"].pop("kind") == "none" and c["regularizer"].pop("kind") == "none"
        c["replay"].pop("size"), c["regularizer"].pop("recadam")
    assert t9_rho1 == t1_rho1
    # full scale (the grid's header): every trial validates with all facts, 30 epochs, length 512
    _, full, _ = load_grid(ROOT / "ablations" / "baselines_table1.yaml", [
        "overrides.data.to_learn_size=null", "overrides.data.ntf_size=null", "overrides.data.max_doc_tokens=null",
        "overrides.train.max_length=512", "overrides.train.epochs=30", "overrides.regularizer.recadam.t0=250",
        "overrides.replay.size=null", "seeds=[0,1,2]"])
    assert len(full) == 21 and all(t.config.train.epochs == 30 and t.config.data.to_learn_size is None for t in full)
    assert "label" not in trials[0].overrides and meta is not None
    spec, trials, _ = load_grid(ROOT / "ablations" / "combos_table6.yaml")
    assert all(t.needs_phi for t in trials) and len(trials) == 6


def test_nested_and_dotted_overrides_merge_key_by_key():
    """`--set overrides.train.epochs=3` changes train.epochs only; it must not replace the train section."""
    base = load_grid(ROOT / "ablations" / "smoke_tiny.yaml")[1][0].config.train
    for ov in (["overrides.train.epochs=3"], ["overrides={train.epochs: 3}"], ["overrides={train: {epochs: 3}}"]):
        train = load_grid(ROOT / "ablations" / "smoke_tiny.yaml", ov)[1][0].config.train
        assert train.epochs == 3, ov
        assert train.model_copy(update={"epochs": base.epochs}) == base, ov  # lr, batch size, ... kept


def test_baseline_row_must_be_a_method_of_the_grid(tmp_path):
    import pytest

    from trainables.errors import InputError

    spec, _, _ = load_grid(ROOT / "ablations" / "smoke_tiny.yaml", ["baseline=Oracle"])
    assert spec.baseline == "Oracle"
    with pytest.raises(InputError) as e:
        load_grid(ROOT / "ablations" / "smoke_tiny.yaml", ["baseline=Finetuned"])
    assert "(baseline)" in e.value.where and "Finetune, Oracle" in e.value.message


def test_the_old_name_of_the_baseline_key_is_a_clear_error(tmp_path):
    """`reference:` (the report's baseline row) was renamed `baseline:`; a grid still using it is told so, with
    the line, rather than getting "unknown key"."""
    import pytest

    from trainables.errors import InputError

    grid = tmp_path / "g.yaml"
    grid.write_text((ROOT / "ablations" / "smoke_tiny.yaml").read_text().replace(
        "base:", "reference: Finetune\nbase:", 1).replace("../examples", str(ROOT / "examples")))
    with pytest.raises(InputError) as e:
        load_grid(grid)
    assert e.value.where.startswith(f"{grid}:") and "(reference)" in e.value.where
    assert "renamed to `baseline`" in e.value.message


def test_a_study_json_written_with_the_old_key_reads_as_baseline(tmp_path):
    import json

    from orchestrator.specs import StudyRecord

    (tmp_path / "study.json").write_text(json.dumps({"kind": "grid", "name": "s", "tracking_uri": "sqlite:///x.db",
                                                     "reference": "Oracle"}))
    assert StudyRecord.read(tmp_path).baseline == "Oracle"

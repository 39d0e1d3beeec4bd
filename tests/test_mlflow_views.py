"""What a study writes for the MLflow UI, without a server: the params of a trial (the grid's axes and what a
reader needs, not the whole config), the saved view of its trials (in the format the installed MLflow UI
reads), a view for a study run before views existed, and durations that leave out time spent interrupted.
The browser shows the result in tests/test_ui_browser.py."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "run_tiny.yaml"


def _cfg(*overrides):
    from trainables.config import config_to_dict, load_config

    return config_to_dict(load_config(TINY, list(overrides)))


def test_params_are_the_axes_and_what_a_reader_needs_not_the_whole_config():
    from trainables.config import flatten
    from orchestrator.mlflow_store import RUN_SETTINGS, run_params

    cfg = _cfg("weighting.scheme=rho1", "params.kind=lora", "replay.kind=mix_review")
    p = run_params(cfg, {"weighting.scheme": "rho1"}, label="RHO-1", seed=0)
    flat = flatten(cfg)
    settings = {k for k in RUN_SETTINGS if flat.get(k) is not None}
    options = {"params.r", "params.alpha", "weighting.rho1.k", "weighting.rho1.selection", "weighting.rho1.reference",
               "weighting.rho1.table_length", "replay.pool", "replay.ratio"}  # of the chosen methods
    assert set(p) == settings | options | {"label", "seed"}
    assert len(p) < len(flat) / 2  # 64 config keys -> 23 params
    assert p["weighting.scheme"] == "rho1" and p["weighting.rho1.k"] == flat["weighting.rho1.k"] == 0.6
    # options of methods the trial does not use are left out (they are in config.json)
    assert not [k for k in p if k.startswith(("weighting.random.", "regularizer.ewc.", "replay.gere.",
                                              "params.kadapter."))]
    # a grid axis outside the settings (here the LoRA rank's dropout) is a param; TemporalWiki periods by name
    tw = dict(cfg, temporalwiki={"periods": [{"name": "0910"}, {"name": "1011"}], "epochs_per_period": 2})
    q = run_params(tw, {"params.dropout": 0.2}, seed=1)
    assert q["params.dropout"] == 0.2 and q["temporalwiki.periods"] == "0910,1011"
    assert q["temporalwiki.epochs_per_period"] == 2 and "temporalwiki.probe_size" not in q  # None: not logged
    # the sample a small machine trains on, the filter and the long-document rule (issue 31)
    tw = dict(cfg, temporalwiki={"periods": [{"name": "0910"}], "max_docs_per_period": 4096, "filter": "taalm",
                                 "long_docs": "truncate"})
    q = run_params(tw, seed=0)
    assert (q["temporalwiki.max_docs_per_period"], q["temporalwiki.filter"], q["temporalwiki.long_docs"]) == \
        (4096, "taalm", "truncate")


def _mlflow_ui_bundle() -> str:
    """The installed MLflow UI's JavaScript (the runs page and its saved views)."""
    import mlflow

    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    return "\n".join(p.read_text(errors="replace") for p in sorted(js.glob("*.js")))


def test_the_saved_view_is_written_as_the_installed_mlflow_ui_reads_it():
    """The tag prefix, the envelope and every state key are the ones the installed MLflow UI's bundle uses (a newer
    MLflow that renamed them fails here, not silently in the browser)."""
    from orchestrator.mlflow_views import VIEW_TAG_PREFIX, trials_view_state, view_envelope

    js = _mlflow_ui_bundle()
    assert f'"{VIEW_TAG_PREFIX}"' in js and '"viewStateShareKey"' in js
    facets = json.loads(re.search(r'=(\["searchFilter","orderByKey",[^\]]*\])', js).group(1))
    ui_state = json.loads(re.search(r'=(\["selectedColumns","columnOrder",[^\]]*\])', js).group(1))
    state = trials_view_state("lama_ckl", ["weighting.scheme", "seed"])
    assert set(state) <= set(facets) | set(ui_state)
    env = json.loads(view_envelope("v", state))
    # MLflow's check of a saved view: a string name, a numeric createdAt and the state as a string
    assert isinstance(env["name"], str) and isinstance(env["createdAt"], int) and isinstance(env["state"], str)
    s = json.loads(env["state"])
    cols = ["metrics.`top_acc`", "metrics.`top_epoch`", "metrics.`nf_acc`", "metrics.`total_knowledge`",
            "params.`weighting.scheme`", "params.`seed`"]
    assert s["selectedColumns"] == cols and s["columnOrder"][:len(cols)] == cols
    assert s["orderByKey"] == "metrics.`top_acc`" and s["orderByAsc"] is False
    assert s["searchFilter"] == "tags.`taalm.role` = 'trial'"
    tw = trials_view_state("temporalwiki", ["params.kind"])
    assert tw["orderByKey"] == "metrics.`avg_changed_ppl`" and tw["orderByAsc"] is True
    with pytest.raises(ValueError, match="over MLflow's 20000"):
        view_envelope("v", trials_view_state("lama_ckl", [f"p{i}" for i in range(2000)]))


def test_a_study_from_before_views_gets_one_from_its_grid_or_its_trials(tmp_path):
    """`taalm ui` / `taalm report` on a study run before views existed: the grid's axes (its trials logged the
    config as config.*), or, when the grid file is gone, the params that differ between the trials."""
    from orchestrator.kinds import view_columns
    from orchestrator.mlflow_store import Study, default_tracking_uri
    from orchestrator.mlflow_views import VIEW_TAG_PREFIX, TRIALS_VIEW, ensure_trials_view, has_trials_view
    from orchestrator.specs import StudyRecord

    study = Study(default_tracking_uri(tmp_path), "old_study", tmp_path)
    for scheme, seed, size in (("uniform", 0, 8), ("oracle", 0, 8), ("uniform", 1, 4)):
        cfg = _cfg(f"weighting.scheme={scheme}", f"seed={seed}", f"data.to_learn_size={size}")
        study.child(f"{scheme}{seed}", f"{scheme} seed {seed}", "trial", {"label": scheme, "seed": seed,
                                                                           "config": cfg}, {})
    grid = ROOT / "ablations" / "smoke_tiny.yaml"
    c = study.client
    for source, expected in ((str(grid), ["config.weighting.scheme", "seed"]),
                             (str(tmp_path / "gone.yaml"), ["config.data.to_learn_size", "config.weighting.scheme",
                                                            "seed"])):
        assert not has_trials_view(c, study.experiment_id)
        record = StudyRecord(kind="grid", name="old_study", tracking_uri=study.uri, source=source)
        assert ensure_trials_view(c, study.experiment_id, record, lambda: view_columns(record)) == TRIALS_VIEW
        state = json.loads(json.loads(c.get_experiment(study.experiment_id).tags[VIEW_TAG_PREFIX + TRIALS_VIEW])["state"])
        assert [k.split("`")[1] for k in state["selectedColumns"] if k.startswith("params.")] == expected
        c.delete_experiment_tag(study.experiment_id, VIEW_TAG_PREFIX + TRIALS_VIEW)


class Clock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_duration_is_running_time_and_the_interruption_is_kept_apart(tmp_path):
    """Trial a reports its first 10 s; trial b fails after 20 s and is retried 30 s later for 10 s; the driver dies
    (60 s in) and `taalm resume` continues a 970 s later for 30 s. Their MLflow durations are their running times,
    40 s and 30 s (a killed driver's attempt counts up to its last record), the rest of their span, 1020 s and 30 s,
    is a tag; the study run likewise (deterministic: a clock moved by hand)."""
    import pickle

    from orchestrator.mlflow_store import INTERRUPTED_TAG, RUNNING_TAG, Study, default_tracking_uri
    from orchestrator.tracking import MlflowTrials

    clock = Clock(1_000_000.0)
    info = {k: {"run_name": k, "role": "trial", "params": {}, "config": {}, "tags": {}} for k in ("a", "b")}
    trial = {k: SimpleNamespace(config={"t": {"trial_key": k}}, trial_id=k, last_result={}, error_file=None)
             for k in info}
    study = Study(default_tracking_uri(tmp_path), "clock", tmp_path, clock=clock)
    cb = MlflowTrials(study, info)
    cb.on_trial_start(0, [], trial["a"])
    cb.on_trial_start(0, [], trial["b"])
    clock.t += 10
    cb.on_trial_result(0, [], trial["a"], {"kind": "epoch", "index": 0, "to_learn_acc": 0.0})
    clock.t += 10
    cb.on_trial_recover(0, [], trial["b"])  # b failed after 20 s; Tune retries it ...
    clock.t += 30
    cb.on_trial_start(0, [], trial["b"])  # ... 30 s later
    clock.t += 10
    cb.on_trial_complete(0, [], trial["b"])
    # the driver dies here (a's epoch 0, at 10 s, was its last record); `taalm resume` 970 s later. Tune hands
    # the new driver its pickled callback: running time is re-read from MLflow, not from the pickle
    clock.t += 970
    cb = pickle.loads(pickle.dumps(cb))
    cb.study = Study(study.uri, "clock", tmp_path, clock=clock)
    cb.on_trial_start(0, [], trial["a"])
    clock.t += 30
    cb.on_trial_result(0, [], trial["a"], {"kind": "epoch", "index": 1, "to_learn_acc": 0.5})
    cb.on_trial_complete(0, [], trial["a"])
    cb.study.finish()
    for key, running, interrupted in (("a", 40.0, 1020.0), ("b", 30.0, 30.0)):
        run = study.client.get_run(cb.run_ids[key])
        assert (run.info.end_time - run.info.start_time) / 1000 == running
        assert float(run.data.tags[RUNNING_TAG]) == running and float(run.data.tags[INTERRUPTED_TAG]) == interrupted
    parent = study.client.get_run(study.parent_id)
    # the study ran 60 s in its first session (until b completed, its last record) and 30 s after the resume
    assert (parent.info.end_time - parent.info.start_time) / 1000 == 90.0
    assert float(parent.data.tags[INTERRUPTED_TAG]) == 970.0

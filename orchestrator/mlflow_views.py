"""Where a study opens in the MLflow UI: a saved runs-table view of its trials, and MLflow's compare page.

MLflow 3.15+ keeps the saved views of an experiment's runs table ("Views" on the runs page) as experiment tags,
``mlflow.sharedViewState.<view id>`` = ``{"name", "createdAt", "updatedAt", "state"}`` where ``state`` is the
JSON of the page's search facets (filter, sort) and table state (selected columns, their order and widths);
the page opens a view from its URL, ``#/experiments/<id>/runs?viewStateShareKey=<view id>``. Nothing in MLflow's
Python API or REST API names these views: they are written here as the UI writes them (the tag prefix, the
envelope and the state keys below are those of the runs page's JavaScript in MLflow 3.17.2,
mlflow/server/js/build; tests/test_mlflow_views.py checks them against the installed bundle), through the
ordinary ``set_experiment_tag`` call, so a local store and a remote tracking server (REST) get the same view.

The compare page, ``#/compare-runs?runs=[ids]&experiments=[ids]``, reads only those two parameters: which
parameters and metrics its parallel-coordinates plot starts with is not a URL setting (MLflow picks the first
three parameters that differ between the runs and the first metric they share). ``workflowType`` (read on
every page) opens both pages in the Model-training mode instead of GenAI.
"""

from __future__ import annotations

import json
import time
from typing import Optional
from urllib.parse import quote, urlencode

VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # MLflow's saved views of the runs table (experiment tags)
TRIALS_VIEW = "taalm-trials"  # the id (share key) of a study's view: one per experiment
TRAINING_MODE = {"workflowType": "machine_learning"}  # MLflow 3's Model-training mode (its default is GenAI)
TRIAL_FILTER = "tags.`taalm.role` = 'trial'"
TAG_LIMIT = 20000  # MLflow's limit on an experiment tag's value (MAX_EXPERIMENT_TAG_VAL_LENGTH)

# the summary metrics of a trial, in the order a reader wants them, and the one the trials are sorted by
SUMMARY_COLUMNS = {"lama_ckl": ("top_acc", "top_epoch", "nf_acc", "total_knowledge"),
                   "temporalwiki": ("avg_changed_ppl", "avg_unchanged_ppl")}
DEFAULT_ORDER = {"lama_ckl": ("top_acc", False), "temporalwiki": ("avg_changed_ppl", True)}


def column_key(kind: str, name: str) -> str:
    """MLflow's canonical key of a runs-table column (``metrics.`top_acc```), as its views and sort use it."""
    return f"{kind}.`{name}`"


def _width(name: str, sorted_by: bool = False) -> int:
    """A column just wide enough for its header (MLflow's default, 100 px, cuts `total_knowledge`; the sorted
    column's header also holds the sort icon)."""
    return max(72, min(240, 26 + 7 * len(name) + (22 if sorted_by else 0)))


def trials_view_state(protocol: str, params: list[str], order: Optional[tuple[str, bool]] = None) -> dict:
    """The runs page's state for a study's trials: the study run filtered out, the summary metrics, then the
    given parameters (the grid's axes, the seed) as the first columns, sorted by ``order`` (metric, ascending).
    A sort on a metric also lists every trial flat, not nested under the collapsed study run."""
    metrics = SUMMARY_COLUMNS.get(protocol, SUMMARY_COLUMNS["lama_ckl"])
    metric, ascending = order or DEFAULT_ORDER.get(protocol, DEFAULT_ORDER["lama_ckl"])
    cols = [column_key("metrics", m) for m in metrics] + [column_key("params", p) for p in dict.fromkeys(params)]
    return {
        # search facets (MLflow's URL state of the runs page)
        "searchFilter": TRIAL_FILTER, "orderByKey": column_key("metrics", metric), "orderByAsc": bool(ascending),
        "startTime": "ALL", "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
        # table state: which columns, in which order (Duration, which cannot be hidden, right after them)
        "selectedColumns": cols, "columnOrder": cols + ["duration"],
        "columnWidths": {c: _width(c.split("`")[1], c == column_key("metrics", metric)) for c in cols},
        "runsHiddenMode": "SHOW_ALL",  # every trial in the charts too (MLflow's default: the first 10)
    }


def view_envelope(name: str, state: dict, created_ms: Optional[int] = None) -> str:
    """The tag value MLflow's UI reads a saved view from (``state``: a JSON string, not an object)."""
    now = int(time.time() * 1000)
    value = json.dumps({"name": name, "createdAt": created_ms or now, "updatedAt": now,
                        "state": json.dumps(state, separators=(",", ":"))}, separators=(",", ":"))
    if len(value) > TAG_LIMIT:
        raise ValueError(f"the saved view is {len(value)} characters, over MLflow's {TAG_LIMIT} for a tag "
                         f"(too many columns: {len(state.get('selectedColumns', []))})")
    return value


def save_trials_view(client, experiment_id: str, study_name: str, protocol: str, params: list[str],
                     order: Optional[tuple[str, bool]] = None) -> str:
    """Write (or rewrite) the study's trials view on its experiment; returns its id. Works against any tracking
    store MLflowClient reaches (a local store or a tracking server's REST API)."""
    key = VIEW_TAG_PREFIX + TRIALS_VIEW
    created = None
    old = client.get_experiment(experiment_id).tags.get(key)
    if old:
        try:
            created = int(json.loads(old)["createdAt"])
        except (ValueError, KeyError, TypeError):
            created = None
    metric = (order or DEFAULT_ORDER.get(protocol, DEFAULT_ORDER["lama_ckl"]))[0]
    client.set_experiment_tag(experiment_id, key, view_envelope(
        f"{study_name}: trials by {metric}", trials_view_state(protocol, params, order), created))
    return TRIALS_VIEW


def has_trials_view(client, experiment_id: str) -> bool:
    return bool(client.get_experiment(experiment_id).tags.get(VIEW_TAG_PREFIX + TRIALS_VIEW))


def trials_view_url(base: str, experiment_id: str) -> str:
    """The runs page opened on the study's saved view, in the Model-training mode. No sort or filter in the URL:
    MLflow ignores the view when the URL has its own."""
    query = urlencode({"viewStateShareKey": TRIALS_VIEW, **TRAINING_MODE})
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare page for these runs (in this order: one column each), in the Model-training mode.
    ``runs`` must come first: MLflow reads it as the query's first key."""
    runs = quote(json.dumps(list(run_ids), separators=(",", ":")), safe="")
    exps = quote(json.dumps([str(experiment_id)]), safe="")
    return f"{base.rstrip('/')}/#/compare-runs?runs={runs}&experiments={exps}&{urlencode(TRAINING_MODE)}"


def study_run(client, experiment_id: str):
    """The study's own run (``taalm.role = study``, the trials' parent), or None."""
    found = client.search_runs([experiment_id], "tags.`taalm.role` = 'study'", max_results=1)
    return found[0] if found else None


def trial_runs(client, experiment_id: str, order: tuple[str, bool] = ("top_acc", False)) -> list:
    """The study's trial runs, best first by ``order`` (metric, ascending); runs without it last."""
    runs = client.search_runs([experiment_id], TRIAL_FILTER, max_results=5000)
    metric, ascending = order
    have = [r for r in runs if metric in r.data.metrics]
    have.sort(key=lambda r: (r.data.metrics[metric] if ascending else -r.data.metrics[metric],
                             r.data.tags.get("taalm.label", r.info.run_name or ""), r.data.tags.get("taalm.seed", "")))
    return have + [r for r in runs if metric not in r.data.metrics]


def view_links(client, experiment_id: str, protocol: str, base: str) -> tuple[str, str, int]:
    """(the study's trials view URL, MLflow's compare URL of its trials best first, number of trials) under
    ``base`` (an MLflow UI's address; "" for links relative to the UI that shows them)."""
    order = DEFAULT_ORDER.get(protocol, DEFAULT_ORDER["lama_ckl"])
    ids = [r.info.run_id for r in trial_runs(client, experiment_id, order)]
    return trials_view_url(base, experiment_id), compare_url(base, experiment_id, ids), len(ids)


def study_columns(record, runs: list, declared: Optional[tuple[list[str], Optional[tuple[str, bool]]]] = None
                  ) -> tuple[list[str], tuple[str, bool]]:
    """(parameter columns, sort) of a study's view, for a study whose view was not saved when it ran (studies
    from before views existed): ``declared`` (its kind's columns, from its spec file: orchestrator/kinds.py), else
    the parameters whose values differ between its trials; and the seed. Parameter names as the trials logged
    them (older studies logged the config under ``config.``)."""
    order = DEFAULT_ORDER.get(record.protocol, DEFAULT_ORDER["lama_ckl"])
    keys: list[str] = []
    if declared is not None:
        keys = [k for k in declared[0] if k != "seed"]
        order = declared[1] or order
    logged = set().union(*(r.data.params for r in runs)) if runs else set()
    if not keys:
        skip = {"label", "seed", "config.seed"}
        keys = sorted(k for k in logged if k not in skip and len({r.data.params.get(k) for r in runs}) > 1)
    names = [k if k in logged or f"config.{k}" not in logged else f"config.{k}" for k in keys]
    return names + ["seed"], order


def ensure_trials_view(client, experiment_id: str, record, declared=None) -> Optional[str]:
    """The study's view id, saving one first if the study has none yet (studies run before views existed);
    ``declared``: a function giving its kind's columns (only called then). None if the store refuses it (the
    reason is raised)."""
    if has_trials_view(client, experiment_id):
        return TRIALS_VIEW
    runs = client.search_runs([experiment_id], TRIAL_FILTER, max_results=5000)
    params, order = study_columns(record, runs, declared() if declared is not None else None)
    return save_trials_view(client, experiment_id, record.name, record.protocol, params, order)

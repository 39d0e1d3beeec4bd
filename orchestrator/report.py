"""Reports built from MLflow, the numbers: the trials' rows, the paper-style table (mean ± std over seeds) and the
paired per-fact differences against the baseline (bootstrap intervals). Written out by orchestrator/report_files.py."""

from __future__ import annotations

import math
from pathlib import Path

from .mlflow_views import study_run


LAMA_COLUMNS = ("top_acc", "top_epoch", "nf_acc", "total_knowledge")
LAMA_HEADERS = ("Top Acc", "Epoch", "NF Acc", "Total Knowledge")
TW_COLUMNS = ("avg_changed_ppl", "avg_unchanged_ppl")
TW_HEADERS = ("CHANGED ppl (avg)", "UNCHANGED ppl (avg)")
COLUMNS = LAMA_COLUMNS + TW_COLUMNS


def study_protocol(tracking_uri: str, experiment: str) -> str:
    """The protocol of a study (``lama_ckl`` / ``temporalwiki``), from its parent run's ``taalm.protocol`` tag
    (stores written before that tag existed: ``lama_ckl``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    run = study_run(client, exp.experiment_id) if exp else None
    return run.data.tags.get("taalm.protocol", "lama_ckl") if run else "lama_ckl"


def collect(tracking_uri: str, experiment: str) -> list[dict]:
    """One row per finished or failed trial run of the experiment (the study's children)."""
    from mlflow.tracking import MlflowClient

    from trainables.errors import InputError

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise InputError(tracking_uri, f"no MLflow experiment named {experiment!r}")
    rows = []
    for r in client.search_runs([exp.experiment_id], "tags.`taalm.role` = 'trial'", max_results=10000,
                                order_by=["attributes.start_time ASC"]):
        row = {"label": r.data.tags.get("taalm.label", r.info.run_name), "seed": r.data.tags.get("taalm.seed"),
               "order": int(r.data.tags.get("taalm.order", 10 ** 6)), "start": r.info.start_time,
               "status": r.info.status, "failure": r.data.tags.get("taalm.failure"), "run_id": r.info.run_id}
        for k in COLUMNS:
            row[k] = r.data.metrics.get(k)
        curves = {}
        for name in ("to_learn_acc", "ntf_acc", "changed_ppl", "unchanged_ppl"):
            curves[name] = {m.step: m.value for m in client.get_metric_history(r.info.run_id, name)}
        row["curves"] = curves
        row["per_fact"] = _per_fact(client, r.info.run_id) if r.info.status == "FINISHED" else None
        size = r.data.params.get("data.to_learn_size")  # the run's config, flattened
        row["n_to_learn"] = int(size) if size and size.isdigit() else None
        rows.append(row)
    return sorted(rows, key=lambda r: (r["order"], r["start"]))  # grid order, then start time


def _per_fact(client, run_id: str) -> dict | None:
    """The trial's per_fact.json artifact (every fact's accuracy per epoch), or None (older runs,
    TemporalWiki trials)."""
    import json
    import tempfile

    try:
        names = {a.path for a in client.list_artifacts(run_id)}
        if "per_fact.json" not in names:
            return None
        with tempfile.TemporaryDirectory() as d:
            return json.loads(Path(client.download_artifacts(run_id, "per_fact.json", d)).read_text())
    except (OSError, ValueError):
        return None


def _summary_arrays(pf: dict) -> tuple[list[str], list[str], "np.ndarray", "np.ndarray"]:
    """(TO-LEARN uuids, NTF uuids, [epochs, facts] TO-LEARN accuracies, [epochs, facts] NTF accuracies),
    training epochs only (epoch 0 dropped, as Top Acc is taken over epochs 1..N when any was trained)."""
    import numpy as np

    epochs = pf["epochs"]
    keep = [i for i, e in enumerate(epochs) if e >= 1] or list(range(len(epochs)))
    tl = np.array([pf["to_learn"][i] for i in keep], dtype=float)
    nf = np.array([pf["ntf"][i] for i in keep], dtype=float)
    return pf["to_learn_uuids"], pf["ntf_uuids"], tl, nf


def _boot_summary(tl: "np.ndarray", nf: "np.ndarray", w_tl: "np.ndarray", w_nf: "np.ndarray"):
    """Top Acc and Total Knowledge of one trial under B resampling weights of its facts: ``w_tl`` [B, facts]
    and ``w_nf`` [B, ntf facts] (rows sum to 1). Top Acc = max over epochs of the weighted mean; NF Acc
    at the first epoch reaching it."""
    import numpy as np

    curves = w_tl @ tl.T  # [B, epochs]
    top_epoch = curves.argmax(axis=1)
    top = curves[np.arange(len(curves)), top_epoch]
    nf_at = (w_nf @ nf.T)[np.arange(len(curves)), top_epoch]
    return top, top + nf_at


def paired_differences(rows: list[dict], baseline: str | None = None, n_boot: int = 2000,
                       seed: int = 0) -> list[dict]:
    """Each method against the baseline row (default: "Finetune" if present, else the first method):
    the mean over seeds of the difference in Top Acc and Total Knowledge, with a paired bootstrap 95 %
    interval. Every replicate resamples seeds (with replacement, when there are several) and, within a
    seed, the TO-LEARN and NOT-TO-FORGET facts, the SAME facts for both methods (they share the split),
    and recomputes each method's Top Acc (max over epochs), its epoch and NF Acc there."""
    import numpy as np

    done = [r for r in rows if r["status"] == "FINISHED" and r.get("per_fact")]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    if not done or not labels:
        return []
    if baseline is None:
        baseline = "Finetune" if "Finetune" in labels else labels[0]
    by = {}
    for r in done:
        by.setdefault(r["label"], {})[str(r["seed"])] = _summary_arrays(r["per_fact"])
    if baseline not in by:
        return []
    rng = np.random.default_rng(seed)
    out = []
    for label in labels:
        if label == baseline or label not in by:
            continue
        seeds = sorted(set(by[label]) & set(by[baseline]))
        per_seed_point, per_seed_boot, n_facts = [], [], set()
        for sd in seeds:
            a, b = by[label][sd], by[baseline][sd]
            if a[0] != b[0] or a[1] != b[1]:
                continue  # not the same facts: no pairing possible for this seed
            n_tl, n_nf = len(a[0]), len(a[1])
            n_facts.add((n_tl, n_nf))
            w_tl = rng.multinomial(n_tl, np.full(n_tl, 1 / n_tl), size=n_boot) / n_tl
            w_nf = rng.multinomial(n_nf, np.full(n_nf, 1 / n_nf), size=n_boot) / n_nf if n_nf else None
            if w_nf is None:
                continue
            ones_tl, ones_nf = np.full((1, n_tl), 1 / n_tl), np.full((1, n_nf), 1 / n_nf)
            pa, pb = _boot_summary(a[2], a[3], ones_tl, ones_nf), _boot_summary(b[2], b[3], ones_tl, ones_nf)
            ba, bb = _boot_summary(a[2], a[3], w_tl, w_nf), _boot_summary(b[2], b[3], w_tl, w_nf)
            per_seed_point.append((pa[0][0] - pb[0][0], pa[1][0] - pb[1][0]))
            per_seed_boot.append((ba[0] - bb[0], ba[1] - bb[1]))
        if not per_seed_point:
            continue
        k = len(per_seed_point)
        pick = rng.integers(0, k, size=(n_boot, k)) if k > 1 else np.zeros((n_boot, 1), dtype=int)
        entry = {"method": label, "baseline": baseline, "seeds": k, "n_boot": n_boot,
                 "facts": sorted(n_facts)[0] if len(n_facts) == 1 else None}
        for j, name in enumerate(("top_acc", "total_knowledge")):
            boot = np.stack([d[j] for d in per_seed_boot], axis=1)  # [B, seeds]
            means = boot[np.arange(n_boot)[:, None], pick].mean(axis=1)
            entry[f"d_{name}"] = float(np.mean([p[j] for p in per_seed_point]))
            entry[f"d_{name}_lo"], entry[f"d_{name}_hi"] = (float(x) for x in np.percentile(means, [2.5, 97.5]))
        out.append(entry)
    return out


LEARN_TOLERANCE = 1e-9  # float noise of a mean over facts: a gain of exactly one fact is one fact


def learning(row: dict) -> dict | None:
    """Whether a finished LAMA-CKL trial learned anything within its horizon: ``gain`` = max over its trained
    epochs 1..N of TO-LEARN accuracy − the epoch-0 accuracy, ``learned`` = gain > 1 / n_facts (more than one
    fact's worth; n_facts from per_fact.json, else the run's data.to_learn_size), ``epochs`` = N. None when it
    cannot be told (no epoch 0 or no trained epoch in the curve, the number of facts unknown, not finished)."""
    if row.get("status") != "FINISHED":
        return None
    tl = dict(row.get("curves", {}).get("to_learn_acc") or {})
    pf = row.get("per_fact")
    if not tl and pf and pf.get("to_learn"):
        tl = {e: sum(acc) / len(acc) for e, acc in zip(pf["epochs"], pf["to_learn"]) if acc}
    n = len(pf["to_learn_uuids"]) if pf and pf.get("to_learn_uuids") else row.get("n_to_learn")
    trained = [e for e in tl if e >= 1]
    if 0 not in tl or not trained or not n:
        return None
    gain = max(tl[e] for e in trained) - tl[0]
    return {"gain": gain, "n_facts": n, "epochs": max(trained), "learned": gain > 1.0 / n + LEARN_TOLERANCE}


def not_learned_note(entry: dict) -> str:
    """'did not learn within N epochs (k/m seeds)' for a table row where some seed did not learn, else ''."""
    k = entry.get("did_not_learn_seeds") or 0
    if not k:
        return ""
    lo, hi = entry["horizon_min"], entry["horizon_max"]
    within = (f"{lo} epoch" + ("s" if lo != 1 else "")) if lo == hi else f"{lo}–{hi} epochs"
    judged = entry["judged_seeds"]
    return f"did not learn within {within}" + (f" ({k}/{judged} seeds)" if judged > 1 else "")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and x == x]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def table(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per label, in first-seen order; failed trials are counted, not dropped."""
    order, groups = [], {}
    for r in rows:
        if r["label"] not in groups:
            order.append(r["label"])
            groups[r["label"]] = []
        groups[r["label"]].append(r)
    out = []
    for label in order:
        done = [r for r in groups[label] if r["status"] == "FINISHED"]
        entry = {"method": label, "seeds": len(done), "failed": len(groups[label]) - len(done)}
        for k in COLUMNS:
            entry[k], entry[k + "_std"] = _mean_std([r[k] for r in done])
        # LAMA-CKL: how many seeds did not learn (learning()); numbers, so the CSV and Parquet stay numeric
        verdicts = [v for v in (learning(r) for r in done) if v is not None]
        entry["judged_seeds"] = len(verdicts)
        entry["did_not_learn_seeds"] = sum(not v["learned"] for v in verdicts)
        entry["horizon_min"] = min((v["epochs"] for v in verdicts), default=None)
        entry["horizon_max"] = max((v["epochs"] for v in verdicts), default=None)
        out.append(entry)
    return out


def at_horizon(rows: list[dict], epochs: int) -> list[dict]:
    """The rows as if every trial had been trained ``epochs`` epochs: curves and per-fact accuracies cut after
    that epoch, Top Acc / Epoch / NF Acc / Total Knowledge recomputed from the cut curves. (Training is
    deterministic epoch by epoch, so this equals a run of that many epochs; a shorter trial is left as it is.)"""
    from trainables.metrics import summarize

    out = []
    for r in rows:
        r = dict(r, curves={k: {e: v for e, v in c.items() if e <= epochs} for k, c in r["curves"].items()})
        tl, nf = r["curves"].get("to_learn_acc", {}), r["curves"].get("ntf_acc", {})
        if tl and r["status"] == "FINISHED":
            steps = sorted(tl)
            r.update(summarize([tl[e] for e in steps], [nf.get(e, float("nan")) for e in steps]))
        pf = r.get("per_fact")
        if pf:
            keep = [i for i, e in enumerate(pf["epochs"]) if e <= epochs]
            r["per_fact"] = dict(pf, epochs=[pf["epochs"][i] for i in keep], to_learn=[pf["to_learn"][i] for i in keep],
                                 ntf=[pf["ntf"][i] for i in keep])
        out.append(r)
    return out

"""Reports built from MLflow: the paper-style table (mean ± std over seeds), curves, Pareto front."""

from __future__ import annotations

import math
from pathlib import Path


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
    runs = client.search_runs([exp.experiment_id], "tags.`taalm.role` = 'study'", max_results=1) if exp else []
    return runs[0].data.tags.get("taalm.protocol", "lama_ckl") if runs else "lama_ckl"


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


def paired_markdown(diffs: list[dict]) -> str:
    if not diffs:
        return ""
    ref = diffs[0]["baseline"]
    seeds = sorted({d["seeds"] for d in diffs})
    facts = diffs[0]["facts"]
    over = "facts and seeds" if max(seeds) > 1 else "facts (one seed: seed-to-seed variation is not in these intervals)"
    lines = ["", f"Paired differences against {ref} (mean over seeds; 95 % paired bootstrap interval over {over}, "
                 f"{diffs[0]['n_boot']} replicates" + (f"; {facts[0]} TO-LEARN / {facts[1]} NOT-TO-FORGET facts"
                                                      if facts else "") + "):", "",
             "| method | Δ Top Acc | 95 % interval | Δ Total Knowledge | 95 % interval | seeds | excludes 0 |",
             "|---|---|---|---|---|---|---|"]
    for d in diffs:
        ex = [n for n in ("top_acc", "total_knowledge") if d[f"d_{n}_lo"] > 0 or d[f"d_{n}_hi"] < 0]
        lines.append(f"| {d['method']} | {d['d_top_acc']:+.4f} | [{d['d_top_acc_lo']:+.4f}, {d['d_top_acc_hi']:+.4f}] "
                     f"| {d['d_total_knowledge']:+.4f} | [{d['d_total_knowledge_lo']:+.4f}, "
                     f"{d['d_total_knowledge_hi']:+.4f}] | {d['seeds']} | "
                     f"{', '.join('Top' if n == 'top_acc' else 'Total' for n in ex) or 'no'} |")
    return "\n".join(lines)


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


def markdown(tab: list[dict], protocol: str = "lama_ckl") -> str:
    def cell(e, k):
        m, s = e[k], e[k + "_std"]
        if m != m:
            return "n/a"
        if k.endswith("_ppl"):
            return f"{m:.2f} ± {s:.2f}"
        return f"{m:.1f} ± {s:.1f}" if k == "top_epoch" else f"{m:.4f} ± {s:.4f}"

    tw = protocol == "temporalwiki"
    cols, headers = (TW_COLUMNS, TW_HEADERS) if tw else (LAMA_COLUMNS, LAMA_HEADERS)
    lines = ["| method | " + " | ".join(headers) + " | seeds | failed |",
             "|---|" + "---|" * (len(headers) + 2)]
    for e in tab:
        cells = [cell(e, k) for k in cols]
        note = "" if tw else not_learned_note(e)
        if note:  # the Top Acc of a row that learned nothing is not a result: say so where the number is
            cells[0] = f"{cells[0]} — **{note}**"
        lines.append(f"| {e['method']} | " + " | ".join(cells) + f" | {e['seeds']} | {e['failed']} |")
    if not tw and any(not_learned_note(e) for e in tab):
        lines += ["", "*did not learn within N epochs*: the trial's TO-LEARN accuracy never exceeded its epoch-0 value "
                      "by more than one fact (1 / TO-LEARN facts) in epochs 1..N: its Top Acc, Epoch and NF Acc "
                      "are those of a curve that did not rise (a flat one: NF Acc is the retention after epoch 1).", ""]
    return "\n".join(lines)


def failures(rows: list[dict]) -> str:
    failed = [r for r in rows if r["status"] != "FINISHED"]
    if not failed:
        return ""
    lines = ["", f"Failed trials ({len(failed)}):"]
    for r in failed:
        lines.append(f"- {r['label']} seed {r['seed']} ({r['status']}): {r['failure'] or 'no reason recorded'}")
    return "\n".join(lines)


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


def write_report(tracking_uri: str, experiment: str, out_dir: Path, baseline: str | None = None,
                 more: "list[tuple[str, str]]" = (), epochs: int | None = None) -> dict:
    """Build the report of a study; ``more`` = further (tracking URI, experiment) pairs whose trials join
    the same table (e.g. the seeds of one grid run as two studies). A method and seed found in two
    studies is an error. ``epochs``: report every trial over its first epochs only (:func:`at_horizon`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rows = collect(tracking_uri, experiment)
    protocol = study_protocol(tracking_uri, experiment)
    seen = {(r["label"], r["seed"]): experiment for r in rows}
    for uri, name in more:
        if study_protocol(uri, name) != protocol:
            from trainables.errors import InputError

            raise InputError(f"{uri} ({name})", f"a {study_protocol(uri, name)} study cannot join a {protocol} "
                                                "study's table")
        for r in collect(uri, name):
            if (r["label"], r["seed"]) in seen:
                from trainables.errors import InputError

                raise InputError(f"{uri} ({name})", f"{r['label']} seed {r['seed']} is also in study "
                                                    f"{seen[(r['label'], r['seed'])]!r}: give studies with "
                                                    "different seeds or methods")
            seen[(r["label"], r["seed"])] = name
            rows.append(r)
        rows.sort(key=lambda r: (r["order"], r["start"]))
    if epochs is not None:
        rows = at_horizon(rows, epochs)
    tab = table(rows)
    if baseline is not None and baseline not in {e["method"] for e in tab}:
        from trainables.errors import InputError

        raise InputError("--baseline", f"{baseline!r} is not a method of this study "
                                        f"(methods: {', '.join(e['method'] for e in tab)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in rows:  # each trial's verdict, into trials.parquet
        v = learning(r) if protocol != "temporalwiki" else None
        r["learned"], r["to_learn_gain"] = (v["learned"], v["gain"]) if v else (None, None)
    diffs = paired_differences(rows, baseline)
    md = (f"Over epochs 0..{epochs} of every trial.\n\n" if epochs is not None else "") + \
        markdown(tab, protocol) + paired_markdown(diffs) + failures(rows)
    (out_dir / "table.md").write_text(md + "\n")
    t = pa.Table.from_pylist(tab)
    pacsv.write_csv(t, out_dir / "table.csv")
    pq.write_table(t, out_dir / "table.parquet")
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k not in ("curves", "per_fact")}
                                         for r in rows]), out_dir / "trials.parquet")
    if diffs:
        pacsv.write_csv(pa.Table.from_pylist([{k: v for k, v in d.items() if k != "facts"} for d in diffs]),
                        out_dir / "paired.csv")

    tw = protocol == "temporalwiki"
    names = ("changed_ppl", "unchanged_ppl") if tw else ("to_learn_acc", "ntf_acc")
    titles = ("CHANGED perplexity", "UNCHANGED perplexity") if tw else ("TO-LEARN accuracy", "NOT-TO-FORGET accuracy")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=not tw)
    for label in [e["method"] for e in tab]:
        for ax, name in zip(axes, names):
            per_seed = [r["curves"][name] for r in rows if r["label"] == label and r["curves"].get(name)]
            if not per_seed:
                continue
            steps = sorted(set.intersection(*(set(c) for c in per_seed)))
            ax.plot(steps, [sum(c[s] for c in per_seed) / len(per_seed) for s in steps], "-o", ms=3, label=label)
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("period" if tw else "epoch")
    axes[0].set_ylabel("perplexity (mean over seeds)" if tw else "accuracy (mean over seeds)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    pts = [(e["top_acc"], e["nf_acc"], e["method"]) for e in tab if e["top_acc"] == e["top_acc"]]
    front = pareto_front([(p[0], p[1]) for p in pts])
    for x, y, name in pts:
        ax.scatter(x, y, color="C3" if (x, y) in front else "C0")
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if front:
        fx, fy = zip(*sorted(front))
        ax.plot(fx, fy, "--", color="C3", lw=1)
    ax.set_xlabel("Top Acc (plasticity)")
    ax.set_ylabel("NF Acc (stability)")
    ax.set_title("plasticity–stability", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "pareto.png", dpi=120)
    plt.close(fig)
    if not more:
        _attach_to_study_run(tracking_uri, experiment, out_dir, md)
    return {"markdown": md, "table": tab, "paired": diffs, "dir": str(out_dir), "protocol": protocol}


def _attach_to_study_run(tracking_uri: str, experiment: str, out_dir: Path, md: str) -> None:
    """The table on the study's parent run: as artifacts and as the run's description (MLflow shows the
    ``mlflow.note.content`` tag as Markdown on the run page)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], "tags.`taalm.role` = 'study'", max_results=1) if exp else []
    if not parents:
        return
    rid = parents[0].info.run_id
    for f in ("table.md", "table.csv", "paired.csv", "curves.png", "pareto.png"):
        if (out_dir / f).is_file():
            client.log_artifact(rid, str(out_dir / f), "report")
    links = _study_ui_links(client, exp.experiment_id, parents[0].data.tags.get("taalm.protocol", "lama_ckl"))
    client.set_tag(rid, "mlflow.note.content", f"# {experiment}\n\n{links}{md}\n"[:7900])  # a tag holds 8000 characters


def _study_ui_links(client, experiment_id: str, protocol: str) -> str:
    """Links, relative to the MLflow UI that shows them, to the study's saved view of its trials and to MLflow's
    comparison of them (a Markdown line, or "" when the study has no saved view)."""
    from .mlflow_views import DEFAULT_ORDER, compare_url, has_trials_view, trial_runs, trials_view_url

    if not has_trials_view(client, experiment_id):
        return ""
    order = DEFAULT_ORDER.get(protocol, DEFAULT_ORDER["lama_ckl"])
    ids = [r.info.run_id for r in trial_runs(client, experiment_id, order)]
    view = trials_view_url("", experiment_id).lstrip("/")
    compare = f" · [compare them]({compare_url('', experiment_id, ids).lstrip('/')})" if ids else ""
    return f"[The trials by {order[0]}]({view}){compare}\n\n"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (maximise x, maximise y)."""
    return [p for p in points
            if not any(q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1]) for q in points)]


def study_tracking(study_dir: Path) -> tuple[str, str]:
    from .specs import StudyRecord

    s = StudyRecord.read(study_dir)
    return s.tracking_uri, s.name

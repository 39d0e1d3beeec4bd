"""A study's report on disk: the table (Markdown, CSV, Parquet), the paired differences, the curves and the
Pareto plot (the numbers come from orchestrator/report.py), and the report attached to the study's MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

from trainables.files import write_bytes_atomic

from .mlflow_views import DEFAULT_ORDER, has_trials_view, study_run, view_links
from .report import (LAMA_COLUMNS, LAMA_HEADERS, PER_FACT_FORMAT, TW_COLUMNS, TW_HEADERS, at_horizon, collect,
                     learning, not_learned_note, paired_differences, pareto_front, study_objectives, study_protocol,
                     table)


SHORT = {"top_acc": "Top", "nf_acc": "NF", "total_knowledge": "Total", "nf_acc_at_epoch": "NF@"}


def paired_markdown(diffs: list[dict]) -> str:
    if not diffs:
        return ""
    ref = diffs[0]["baseline"]
    seeds = sorted({d["seeds"] for d in diffs})
    facts = diffs[0]["facts"]
    over = "facts and seeds" if max(seeds) > 1 else "facts (one seed: seed-to-seed variation is not in these intervals)"
    fixed = sorted({d["nf_epoch"] for d in diffs if "nf_epoch" in d})
    stats = [("top_acc", "Δ Top Acc"), ("nf_acc", "Δ NF Acc"), ("total_knowledge", "Δ Total Knowledge")] + \
        ([("nf_acc_at_epoch", f"Δ NF Acc at epoch {fixed[0]}")] if fixed else [])
    lines = ["", f"Paired differences against {ref} (mean over seeds; 95 % paired bootstrap interval over {over}, "
                 f"{diffs[0]['n_boot']} replicates" + (f"; {facts[0]} TO-LEARN / {facts[1]} NOT-TO-FORGET facts"
                                                      if facts else "") + "; NF Acc at each method's own Top-Acc "
                 "epoch" + (f", and at epoch {fixed[0]} for both" if fixed else "") + "):", "",
             "| method | " + " | ".join(f"{h} | 95 % interval" for _, h in stats) + " | seeds | excludes 0 |",
             "|---|" + "---|---|" * len(stats) + "---|---|"]
    for d in diffs:
        cells, ex = [], []
        for n, _ in stats:
            if f"d_{n}" not in d:
                cells.append("n/a | n/a")
                continue
            cells.append(f"{d[f'd_{n}']:+.4f} | [{d[f'd_{n}_lo']:+.4f}, {d[f'd_{n}_hi']:+.4f}]")
            if d[f"d_{n}_lo"] > 0 or d[f"d_{n}_hi"] < 0:
                ex.append(SHORT[n] + (str(d["nf_epoch"]) if n == "nf_acc_at_epoch" else ""))
        lines.append(f"| {d['method']} | " + " | ".join(cells) + f" | {d['seeds']} | {', '.join(ex) or 'no'} |")
    return "\n".join(lines)


def markdown(tab: list[dict], protocol: str = "lama_ckl") -> str:
    def cell(e, k):
        m, s = e[k], e[k + "_std"]
        if m != m:
            return "n/a"
        if e["seeds"] < 2:  # one value: no spread over seeds to show (a "± 0" would claim one)
            return f"{m:.2f}" if k.endswith("_ppl") else f"{m:.1f}" if k == "top_epoch" else f"{m:.4f}"
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
    single = [e["method"] for e in tab if e["seeds"] == 1]
    if single:
        lines += ["", f"One seed for {', '.join(single)}: no spread over seeds (a number without ±), so a comparison "
                      "involving these rows is not conclusive; more seeds: `--set seeds=[0,1,2]`."]
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


def stopped_early(rows: list[dict]) -> str:
    stopped = [r for r in rows if r.get("stopped_early")]
    if not stopped:
        return ""
    lines = ["", f"Stopped early ({len(stopped)} of {len(rows)} trials; their summary is over the epochs they ran):"]
    lines += [f"- {r['label']} seed {r['seed']}: {r['stopped_early']}" for r in stopped]
    return "\n".join(lines)


def search_front(rows: list[dict], objectives: list[tuple[str, str]]) -> list[dict]:
    """A two-objective search's Pareto front: the finished trials no other finished trial dominates in the
    objectives (each trial is a point; a trial stopped early counts with the summary it reached)."""
    if len(objectives) != 2:
        return []
    names, modes = tuple(o[0] for o in objectives), tuple(o[1] for o in objectives)
    pts = [r for r in rows if r["status"] == "FINISHED" and all(isinstance(r.get(n), float) and r[n] == r[n]
                                                                 for n in names)]
    return [pts[i] for i in pareto_front([tuple(r[n] for n in names) for r in pts], modes)]


def front_markdown(front: list[dict], objectives: list[tuple[str, str]], n: int) -> str:
    if not front:
        return ""
    what = ", ".join(f"{m} {mode}" for m, mode in objectives)
    lines = ["", f"Pareto front of the search ({what}): {len(front)} of {n} finished trials, none dominated by another:"]
    lines += [f"- {r['label']}: " + ", ".join(f"{m} {r[m]:.4f}" for m, _ in objectives) for r in front]
    return "\n".join(lines)


def write_report(tracking_uri: str, experiment: str, out_dir: Path, baseline: str | None = None,
                 more: "list[tuple[str, str]]" = (), epochs: int | None = None, nf_epoch: int | None = None) -> dict:
    """Build the report of a study; ``more`` = further (tracking URI, experiment) pairs whose trials join
    the same table (e.g. the seeds of one grid run as two studies). A method and seed found in two
    studies is an error. ``epochs``: report every trial over its first epochs only (:func:`at_horizon`);
    ``nf_epoch``: the paired differences also compare NF Acc at that epoch. Writes per_fact.json: every finished
    trial's per-fact accuracies, what the paired intervals are computed from (:func:`rows_from_per_fact`)."""
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
    diffs = paired_differences(rows, baseline, nf_epoch=nf_epoch)
    objectives = study_objectives(tracking_uri, experiment) if not more else []
    front = search_front(rows, objectives)
    on_front = {r["run_id"] for r in front}
    for r in rows:
        r["on_front"] = r["run_id"] in on_front if front else None
    md = (f"Over epochs 0..{epochs} of every trial.\n\n" if epochs is not None else "") + \
        markdown(tab, protocol) + paired_markdown(diffs) + \
        front_markdown(front, objectives, sum(r["status"] == "FINISHED" for r in rows)) + \
        stopped_early(rows) + failures(rows)
    (out_dir / "table.md").write_text(md + "\n")
    t = pa.Table.from_pylist(tab)
    pacsv.write_csv(t, out_dir / "table.csv")
    pq.write_table(t, out_dir / "table.parquet")
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k not in ("curves", "per_fact")}
                                         for r in rows]), out_dir / "trials.parquet")
    write_bytes_atomic(out_dir / "per_fact.json", json.dumps({"format": PER_FACT_FORMAT, "trials": [
        {k: r[k] for k in ("label", "seed", "status", "per_fact")} for r in rows if r.get("per_fact")]}).encode())
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
    if axes[1].get_legend_handles_labels()[0]:  # no curve at all (every trial failed): no legend to draw
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    pts = [(e["top_acc"], e["nf_acc"], e["method"]) for e in tab if e["top_acc"] == e["top_acc"]]
    best = [pts[i][:2] for i in pareto_front([(p[0], p[1]) for p in pts])]
    for x, y, name in pts:
        ax.scatter(x, y, color="C3" if (x, y) in best else "C0")
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if best:
        fx, fy = zip(*sorted(best))
        ax.plot(fx, fy, "--", color="C3", lw=1)
    ax.set_xlabel("Top Acc (plasticity)")
    ax.set_ylabel("NF Acc (stability)")
    ax.set_title("plasticity–stability", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "pareto.png", dpi=120)
    plt.close(fig)
    if not more:
        _attach_to_study_run(tracking_uri, experiment, out_dir, md)
    return {"markdown": md, "table": tab, "paired": diffs, "dir": str(out_dir), "protocol": protocol,
            "front": [{"run_id": r["run_id"], "label": r["label"], **{m: r[m] for m, _ in objectives}} for r in front]}


def _attach_to_study_run(tracking_uri: str, experiment: str, out_dir: Path, md: str) -> None:
    """The table on the study's parent run: as artifacts and as the run's description (MLflow shows the
    ``mlflow.note.content`` tag as Markdown on the run page), with links (relative to the MLflow UI that shows
    them) to the study's saved view of its trials and to MLflow's comparison of them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    parent = study_run(client, exp.experiment_id) if exp else None
    if parent is None:
        return
    rid = parent.info.run_id
    for f in ("table.md", "table.csv", "paired.csv", "curves.png", "pareto.png"):
        if (out_dir / f).is_file():
            client.log_artifact(rid, str(out_dir / f), "report")
    links = ""
    if has_trials_view(client, exp.experiment_id):
        protocol = parent.data.tags.get("taalm.protocol", "lama_ckl")
        view, compare, n = view_links(client, exp.experiment_id, protocol, "")
        by = DEFAULT_ORDER.get(protocol, DEFAULT_ORDER["lama_ckl"])[0]
        links = f"[The trials by {by}]({view.lstrip('/')})" + \
            (f" · [compare them]({compare.lstrip('/')})" if n else "") + "\n\n"
    client.set_tag(rid, "mlflow.note.content", f"# {experiment}\n\n{links}{md}\n"[:7900])  # a tag holds 8000 characters

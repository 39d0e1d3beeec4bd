"""The `taalm` commands that run one loop in this process (`run`, `meta-train`, `temporalwiki`) and the LAMA-CKL
data commands: parse, call the loop with a progress bar, print. The study commands are in orchestrator/cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trainables.errors import InputError

SET_HELP = "Override a config key: dotted.key=value (repeatable)."
console = Console(stderr=True)
app = typer.Typer()  # the commands below, added to the `taalm` command (orchestrator/cli.py)
data_app = typer.Typer(no_args_is_help=True, help="LAMA-CKL data: validate, tailor to a model.")


class RichProgress:
    """What a loop shows on the terminal (one shape for the three loops, trainables/loop.py): a progress bar over
    the optimisation steps, one line per report, a first line saying what runs."""

    def __init__(self, first_line, report_line, step_text):
        from trainables.loop import Callback

        outer = self

        class _CB(Callback):
            def on_start(self, info):
                line = first_line(info)
                if info.get("resumed_from") is not None:
                    line += f" [resumed after {info['resumed_from']}]"
                console.print(line, highlight=False, soft_wrap=True)

            def on_step(self, unit, step, n_steps, loss):
                outer.progress.update(outer.task, total=n_steps, completed=step + 1, description=step_text(unit, loss))

            def on_report(self, r):
                console.print(report_line(r), highlight=False, soft_wrap=True)

        self.callback = _CB()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=True)
        self.task = self.progress.add_task("loading", total=None)


@app.command()
def run(
    config: Path = typer.Argument(..., help="Run config (YAML)."),
    out: Path = typer.Option(..., "--out", help="Output directory (metrics.json, checkpoint/)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    resume: bool = typer.Option(True, help="Resume from DIR/checkpoint when it exists."),
):
    """Run one continual-update run on LAMA-CKL and write OUT/metrics.json."""
    from trainables.config import load_config

    cfg = load_config(config, set_)  # validated before anything is created
    from trainables.continual import continual_update

    def report_line(r):
        m = r.metrics
        loss = "" if m["train_loss"] is None else f" loss {m['train_loss']:.4f}"
        return (f"epoch {r.index:>3}: TO-LEARN acc {m['to_learn_acc']:.4f} (EM {m['to_learn_em']:.3f})  "
                f"NTF acc {m['ntf_acc']:.4f} (EM {m['ntf_em']:.3f}){loss}  [{r.wall_seconds:.1f}s]")

    ui = RichProgress(lambda i: f"[bold]run[/] TO-LEARN {i['n_to_learn']} facts, NOT-TO-FORGET {i['n_ntf']}, "
                                f"{i['n_trainable_params']:,} trainable parameters ({i['split']['origin']})",
                      report_line, lambda epoch, loss: f"epoch {epoch}/{cfg.train.epochs} loss {loss:.3f}")
    with ui.progress:
        metrics = continual_update(cfg, out_dir=out, callbacks=[ui.callback], resume=resume)
    console.print(f"[bold green]done[/] Top Acc {metrics['top_acc']:.4f} (epoch {metrics['top_epoch']}), "
                  f"NF Acc {_fmt(metrics['nf_acc'])}, Total Knowledge {_fmt(metrics['total_knowledge'])}, "
                  f"{metrics['wall_seconds']:.1f}s -> {out / 'metrics.json'}")


@app.command("meta-train")
def meta_train_cmd(
    config: Path = typer.Argument(..., help="Meta-training config (YAML)."),
    out: Path = typer.Option(..., "--out", help="Output directory (phi/, meta_metrics.json, heatmap.html, "
                                                "checkpoint/)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    resume: bool = typer.Option(True, help="Continue from OUT/checkpoint (the last check) when it exists; "
                                           "meta.steps / meta.epochs may be raised to train φ longer."),
):
    """Meta-train Train-Attention φ (TAALM) on the tailored Train-Attention pool."""
    from trainables.config import load_config
    from trainables.meta import MetaConfig, meta_train

    cfg = load_config(config, set_, schema=MetaConfig)

    def report_line(r):
        v = r.metrics
        return (f"step {r.index:>4}: validation acc {v['val_acc']:.4f}  weight on object tokens "
                f"{v['object_weight_share']:.1%} (uniform {v['uniform_share']:.1%}, oracle 100%)")

    ui = RichProgress(lambda i: f"[bold]meta-train[/] {i['n_train_examples']} training and {i['n_val_examples']} "
                                f"held-out facts, {i['n_steps']} meta-steps",
                      report_line, lambda unit, obj: f"meta-step objective {obj:.4f}")
    with ui.progress:
        m = meta_train(cfg, out_dir=out, callbacks=[ui.callback], resume=resume)
    f = m["objective_fixed_set"]
    h = m.get("held_out_focus")
    if h:
        console.print(f"on {h['n_docs']} TO-LEARN documents (outside φ's pool): {h['object_weight_share']:.1%} of "
                      f"the weight on object tokens (uniform {h['uniform_share']:.1%}, oracle 100%)")
    console.print(f"[bold green]done[/] best validation acc {m['best_val_acc']:.4f} at step {m['best_step']}; "
                  f"objective on a fixed set {f['before']:.4f} -> {f['after']:.4f}; {m['wall_seconds']:.1f}s "
                  f"-> {out / 'phi'}")


@app.command()
def temporalwiki(
    config: Path = typer.Argument(..., help="TemporalWiki config (YAML): a run config plus `temporalwiki.periods`."),
    out: Path = typer.Option(..., "--out", help="Output directory (metrics.json, checkpoint/)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    resume: bool = typer.Option(True, help="Continue after the last checkpointed period when OUT/checkpoint exists."),
):
    """Run the TemporalWiki protocol: periods in order, θ carried over, CHANGED/UNCHANGED perplexity."""
    from trainables.config import load_config
    from trainables.temporalwiki import TemporalWikiConfig, resolve_paths, temporalwiki_run

    cfg = resolve_paths(load_config(config, set_, schema=TemporalWikiConfig), config.resolve().parent)

    def report_line(r):
        m = r.metrics
        return (f"period {r.label}: CHANGED ppl {m['changed_ppl']:.2f}  UNCHANGED ppl {m['unchanged_ppl']:.2f}  "
                f"({m['n_docs']} documents, loss {m['train_loss']:.3f})")

    ui = RichProgress(lambda i: f"[bold]temporalwiki[/] periods {', '.join(i['periods'])}", report_line,
                      lambda period, loss: f"period {cfg.temporalwiki.periods[period].name} loss {loss:.3f}")
    with ui.progress:
        m = temporalwiki_run(cfg, out_dir=out, callbacks=[ui.callback], resume=resume)
    console.print(f"[bold green]done[/] average CHANGED ppl {m['avg_changed_ppl']:.2f}, UNCHANGED ppl "
                  f"{m['avg_unchanged_ppl']:.2f}, {m['wall_seconds']:.1f}s -> {out / 'metrics.json'}",
                  highlight=False, soft_wrap=True)


@data_app.command("validate")
def data_validate(directory: Optional[Path] = typer.Argument(None, help="LAMA-CKL directory (default: shipped)")):
    """Validate every LAMA-CKL record (file:line and field on the first error)."""
    from trainables.data import load_lama

    lama = load_lama(directory)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in lama.facts.items())
    console.print(f"ok: {lama.dir} ({sizes}), data hash {lama.hash}")


@data_app.command("tailor")
def data_tailor(
    model: str = typer.Option(..., "--model", help="tiny | smollm2-135m | hf:<id> | a local path"),
    out: Path = typer.Option(..., "--out", help="Directory for split.json and scores.json"),
    task: str = typer.Option("descriptive", help="descriptive | schematic"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="LAMA-CKL directory (default: shipped)"),
    to_learn_size: Optional[int] = typer.Option(None, help="Subsample TO-LEARN to this many facts"),
    ntf_size: Optional[int] = typer.Option(None, help="Subsample NOT-TO-FORGET to this many facts"),
    ta_pool_size: Optional[int] = typer.Option(None, help="Subsample the Train-Attention pool"),
    max_doc_tokens: Optional[int] = typer.Option(None, help="Drop trained-on facts with longer evidence"),
    seed: int = typer.Option(0, help="Subsampling seed"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Score every fact with MODEL and write the TO-LEARN / NOT-TO-FORGET / Train-Attention split."""
    from trainables.config import load_config

    overrides = [f"model.name={model}", f"data.task={task}", f"data.seed={seed}", "data.split=tailored"]
    for key, val in (("data.dir", data_dir), ("data.to_learn_size", to_learn_size), ("data.ntf_size", ntf_size),
                     ("data.max_doc_tokens", max_doc_tokens)):
        if val is not None:
            overrides.append(f"{key}={val}")
    cfg = load_config(None, overrides + list(set_ or []))
    if ta_pool_size is not None and ta_pool_size < 1:
        raise InputError("--ta-pool-size", "must be >= 1")
    from trainables.data import load_lama
    from trainables.tailor import build_split, write_split
    from trainables.theta import build_theta, resolve_device

    lama = load_lama(cfg.data.dir)
    device = resolve_device(cfg.device)
    theta = build_theta(cfg.model, None, device, cfg.seed)  # the base model only: nothing trains
    with Progress(TextColumn("scoring facts"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as prog:
        t = prog.add_task("score", total=None)
        split = build_split(cfg.data, cfg.model, lama, theta.tokenizer, lambda: theta.model,
                            cfg.eval.batch_size, device, ta_pool_size,
                            progress=lambda done, total: prog.update(t, completed=done, total=total))
    write_split(split, out, lama, cfg.data.task)
    s = split.summary()
    console.print(f"TO-LEARN {s['to_learn']}, NOT-TO-FORGET {s['ntf']}, Train-Attention pool {s['ta_pool']} "
                  f"-> {out / 'split.json'}")


def _fmt(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.4f}"

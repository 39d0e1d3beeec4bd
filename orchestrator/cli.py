"""The `taalm` command line: each command parses its options, calls one library function and prints.

The study commands (`ablate`, `tune`, `resume`) read the study's spec file once through the study kinds'
table (orchestrator/kinds.py) and run it with the live console; `report`, `ui` and `ray` call
orchestrator/report_files.py, orchestrator/mlflow_server.py and orchestrator/local_ray.py. The commands that run
one loop in this process (`run`, `meta-train`, `temporalwiki`, `data`) are in orchestrator/cli_runs.py.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from trainables.errors import InputError

from orchestrator import cli_runs

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Continual knowledge learning (TAALM and baselines): runs, tailoring, studies.")
app.registered_commands.extend(cli_runs.app.registered_commands)  # run, meta-train, temporalwiki
app.add_typer(cli_runs.data_app, name="data")
ray_app = typer.Typer(no_args_is_help=True,
                      help="A local Ray instance kept running between studies (127.0.0.1 only, token authentication): "
                           "studies started without --address and --num-cpus attach to it instead of starting Ray.")
app.add_typer(ray_app, name="ray")
console = Console(stderr=True)

NUM_GPUS_HELP = ("GPUs of a new local Ray instance (default: detected; given: the study starts its own). On a machine "
                 "without GPUs a number declares logical GPUs: trials are placed on them as on real ones and run on "
                 "the CPU, saying so.")
ADDRESS_HELP = ("Attach to a running Ray cluster (auto, HOST:PORT, ray://...); `local`: a new local instance. Default: "
                "the instance `taalm ray start` keeps running, if any, else a new local one.")
NUM_CPUS_HELP = "CPUs of a new local Ray instance (given: the study starts its own, even when `taalm ray start` runs)."
STORAGE_HELP = ("Where Tune's state, checkpoints, φ and the epoch-0 evaluations live (overrides the file's `storage`): "
                "a directory every node mounts at the same path, or a URI (s3://BUCKET/PREFIX, gs://...). Default: "
                "the study directory (one machine).")
VERBOSE_HELP = "Show Ray's, Tune's and MLflow's own output too (always in <study>/logs/study.log)."


def _say(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True)


@contextmanager
def study_console(name: str):
    """The study's live progress view (a Tune callback), closed before the report is printed; a resumed
    experiment's console becomes this one (its clock starts now)."""
    from orchestrator.console import StudyConsole

    view = StudyConsole(name, console=console).activate()
    try:
        yield view
    finally:
        view.close()


EXIT_STOPPED = 1  # the study could not finish: `taalm resume` continues it (2: bad input, nothing started)
EXIT_INTERRUPTED = 130


@contextmanager
def study_stops(study_dir: Path, verbose: bool, progress=None, resumable: bool = True):
    """A study that cannot go on (Tune stopped by a fault no retry fixes, a refused write, Ctrl-C) ends with a short
    message naming the cause and the `taalm resume` command, never a traceback of library internals: that goes to
    the study log (and, with --verbose, to the console too)."""
    try:
        yield
    except (InputError, typer.Exit, typer.Abort):
        raise
    except (Exception, KeyboardInterrupt) as e:
        import traceback

        from rich.markup import escape

        from orchestrator.faults import StudyStopped, disk_error, study_stop_message

        if progress is not None:
            progress.close()
        log = study_dir / "logs" / "study.log"
        text = "".join(traceback.format_exception(e))
        logged = True
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as fh:
                fh.write(f"taalm: the study stopped:\n{text}")
        except OSError:
            logged = False
        interrupted = isinstance(e, KeyboardInterrupt) or (isinstance(e, StudyStopped) and e.reason == "interrupted")
        if isinstance(e, StudyStopped):
            why = "interrupted" if interrupted else e.reason
        else:
            why = study_stop_message(e, study_dir, _sqlite_store(study_dir))
        room = disk_error(e) is not None or (isinstance(e, StudyStopped) and not interrupted)
        console.print(f"[bold red]the study stopped[/]: {escape(why)}", highlight=False, soft_wrap=True)
        then = "once there is room (or the directory is writable again), " if room else ""
        if resumable:
            console.print(f"Finished trials are kept and the others continue from their last checkpoint: {then}run\n"
                          f"  taalm resume {study_dir}", highlight=False, soft_wrap=True)
        if verbose or not logged:
            console.print(escape(text), highlight=False, soft_wrap=True)
        else:
            console.print(f"(the full error is in {log})", highlight=False, soft_wrap=True)
        sys.exit(EXIT_INTERRUPTED if interrupted else EXIT_STOPPED)


def _sqlite_store(study_dir: Path) -> Optional[str]:
    """The study's sqlite MLflow store file, if that is its store (to name it when a write to it is refused)."""
    from orchestrator.specs import StudyRecord

    try:
        uri = StudyRecord.read(study_dir).tracking_uri
    except (InputError, OSError):
        return None
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


def _view_line(study_dir: Path, uri: str) -> str:
    """The line naming the study's trials view in the MLflow UI (`taalm ui` serves a local store on port 5000 by
    default); the view is saved now if the study has none yet, so do this before the report goes onto the study
    run (its description links the view)."""
    from mlflow.exceptions import MlflowException

    from orchestrator.kinds import study_links
    from orchestrator.mlflow_server import ui_base

    try:
        links = study_links(study_dir, ui_base(uri))
    except (MlflowException, OSError, ValueError) as e:
        return f"no saved view of the trials in MLflow ({e})"
    if links is None:
        return ""
    how = "" if uri.startswith(("http://", "https://")) else f" (with `taalm ui {study_dir}`)"
    return f"trials in the MLflow UI{how}: {links[0]}"


def _run_study(loaded, study_dir: Path, **options) -> None:
    """Run a study (read once: ``loaded``) with the live console, then print its table and where it is."""
    from orchestrator.report_files import write_report
    from orchestrator.options import StudyOptions

    with study_console(loaded.name) as progress, study_stops(study_dir, options.get("verbose", False), progress):
        r = loaded.run(StudyOptions(progress=progress, **options))
    view = _view_line(Path(r["study_dir"]), r["tracking_uri"])
    rep = write_report(r["tracking_uri"], r["experiment"], Path(r["study_dir"]) / "report", r.get("baseline"))
    print(rep["markdown"])
    _say(f"study {r['study_dir']} ({r['trials']} trials, {r['failed']} failed); MLflow {r['tracking_uri']}; "
         f"`taalm ui {r['study_dir']}` to browse")
    if view:
        _say(view)


def _start(kind: str, path: Path, set_, out: Path, **options) -> None:
    from orchestrator.kinds import load

    loaded = load(kind, path, set_)  # validated before Ray or MLflow start
    console.print(f"[bold]{loaded.name}[/]: {loaded.kind.headline(loaded.spec)}", highlight=False)
    _run_study(loaded, out / loaded.name, out_root=out, **options)


@app.command()
def ablate(
    grid: Path = typer.Argument(..., help="Ablation grid (YAML)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a grid key: dotted.key=value."),
    out: Path = typer.Option(Path("runs"), "--out", help="Root of study directories (OUT/<grid name>/)."),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri",
                                               help="MLflow tracking URI (default: sqlite in the study dir)."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help=NUM_CPUS_HELP),
    num_gpus: Optional[float] = typer.Option(None, "--num-gpus", min=0, help=NUM_GPUS_HELP),
    retrain_phi: bool = typer.Option(False, "--retrain-phi",
                                     help="Meta-train φ anew (ignore the φ cache and the φ shipped in ablations/phi/)."),
    storage: Optional[str] = typer.Option(None, "--storage", envvar="TAALM_STORAGE", help=STORAGE_HELP),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
):
    """Run an ablation grid: every trial under Ray Tune (Ray Train for multi-worker trials), tracked in MLflow;
    then the table."""
    _start("grid", grid, set_, out, address=address, tracking_uri=tracking_uri, num_cpus=num_cpus, num_gpus=num_gpus,
           retrain_phi=retrain_phi, storage=storage, verbose=verbose)


@app.command()
def tune(
    space: Path = typer.Argument(..., help="Search space (YAML)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a search-space key: dotted.key=value."),
    out: Path = typer.Option(Path("runs"), "--out", help="Root of study directories (OUT/<name>/)."),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri"),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help=NUM_CPUS_HELP),
    num_gpus: Optional[float] = typer.Option(None, "--num-gpus", min=0, help=NUM_GPUS_HELP),
    storage: Optional[str] = typer.Option(None, "--storage", envvar="TAALM_STORAGE", help=STORAGE_HELP),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
):
    """Search hyper-parameters with Optuna under Ray Tune (TPE; NSGA-II for two objectives; optional ASHA)."""
    _start("search", space, set_, out, address=address, tracking_uri=tracking_uri, num_cpus=num_cpus,
           num_gpus=num_gpus, storage=storage, verbose=verbose)


@app.command()
def resume(
    study: Path = typer.Argument(..., help="A study directory (OUT/<name>) of an interrupted `taalm ablate`."),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help=NUM_CPUS_HELP),
    num_gpus: Optional[float] = typer.Option(None, "--num-gpus", min=0, help=NUM_GPUS_HELP),
    storage: Optional[str] = typer.Option(None, "--storage", help="Where the study's storage is now (default: where "
                                                                  "it was, as study.json records it)."),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
):
    """Resume an interrupted study (a grid or a search): finished trials are kept, the others continue from their
    checkpoints."""
    from orchestrator.kinds import for_resume

    record, loaded = for_resume(study)
    _run_study(loaded, study, out_root=Path(record.out_root), address=address, tracking_uri=record.tracking_uri,
               num_cpus=num_cpus, num_gpus=num_gpus, verbose=verbose, resume=True,
               storage=storage or record.storage)


@app.command()
def report(
    studies: List[Path] = typer.Argument(..., help="Study directories (OUT/<name>) written by `taalm ablate`; "
                                                   "several: their trials in one table (e.g. seeds run apart)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri"),
    experiment: Optional[str] = typer.Option(None, "--experiment"),
    out: Optional[Path] = typer.Option(None, "--out", help="Report directory (default: FIRST_STUDY/report)."),
    baseline: Optional[str] = typer.Option(None, "--baseline",
                                           help="Method the paired differences are taken against "
                                                "(default: the grid's `baseline`, else Finetune)."),
    old_reference: Optional[str] = typer.Option(None, "--reference", hidden=True),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1,
                                         help="Report every trial over its first N epochs only (Top Acc, NF Acc, "
                                              "paired differences recomputed from the per-epoch results)."),
    nf_epoch: Optional[int] = typer.Option(None, "--nf-epoch", min=0, help="Also compare NF Acc at this epoch."),
):
    """Build the table (Markdown, CSV, Parquet), paired differences, curves and Pareto plot from MLflow."""
    from orchestrator.report_files import write_report
    from orchestrator.specs import StudyRecord

    if old_reference is not None:
        raise InputError("--reference", f"renamed to --baseline (the method the paired differences are taken "
                                        f"against): --baseline {old_reference}")
    if tracking_uri and experiment:
        sources = [(tracking_uri, experiment)]
    else:
        records = [StudyRecord.read(s) for s in studies]
        sources = [(r.tracking_uri, r.name) for r in records]
        baseline = baseline or records[0].baseline
    views = [] if tracking_uri and experiment else [_view_line(d, uri) for d, (uri, _) in zip(studies, sources)]
    rep = write_report(*sources[0], out or studies[0] / "report", baseline, more=sources[1:], epochs=epochs,
                       nf_epoch=nf_epoch)
    print(rep["markdown"])
    console.print(f"-> {rep['dir']}/ (table.md, table.csv, table.parquet, trials.parquet, paired.csv, curves.png, "
                  f"pareto.png)", highlight=False, soft_wrap=True)
    for line in filter(None, views):
        console.print(line, highlight=False, soft_wrap=True)


@app.command()
def ui(
    study: Path = typer.Argument(..., help="A study directory."),
    port: int = typer.Option(5000, help="Port on 127.0.0.1."),
    host: str = typer.Option("127.0.0.1", help="Bind address (loopback by default)."),
):
    """Start the MLflow UI on the study's tracking store (127.0.0.1 unless told otherwise) and print where the study
    opens: its trials (a saved view: summary metrics, the grid's axes and the seed as the first columns, best Top
    Acc first) and MLflow's comparison of them, both in the Model-training mode. The server's own output (uvicorn's
    request log) goes to <study>/logs/study.log."""
    from orchestrator.kinds import study_links
    from orchestrator.mlflow_server import serve_ui

    # sys.exit, not typer.Exit: main() runs typer with standalone_mode=False, where click returns typer.Exit's code
    # instead of exiting with it (a failed server used to end `taalm ui` with 0)
    sys.exit(serve_ui(study, host, port, study_links, _say))


@ray_app.command("start")
def ray_start(
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="CPUs of the instance (default: this machine's)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port of its GCS on 127.0.0.1 (default: a free one)."),
):
    """Start a local Ray instance for the studies of this environment (or say where the running one is)."""
    from orchestrator.local_ray import record_path, start_head

    rec, started = start_head(num_cpus, port)
    console.print(f"{'started' if started else 'already running'}: local Ray instance at {rec['address']} "
                  f"({rec['num_cpus']} CPUs, 127.0.0.1 only), recorded in {record_path()}; `taalm ablate` and "
                  f"`taalm tune` without --address and --num-cpus attach to it; `taalm ray stop` stops it",
                  highlight=False, soft_wrap=True)


@ray_app.command("status")
def ray_status():
    """Whether a local Ray instance is recorded and running, and whether studies started here attach to it."""
    from orchestrator.local_ray import running_head

    rec, why = running_head()
    if rec is None:
        console.print(f"no instance to attach to: {why}; studies start a Ray instance of their own",
                      highlight=False, soft_wrap=True)
        return
    console.print(f"running: local Ray instance at {rec['address']} ({rec['num_cpus']} CPUs); studies started here "
                  f"without --address and --num-cpus attach to it", highlight=False, soft_wrap=True)


@ray_app.command("stop")
def ray_stop():
    """Stop the local Ray instance `taalm ray start` started (its processes only; no other Ray on this machine)."""
    from orchestrator.local_ray import record_path, stop_head

    rec = stop_head()
    if rec is None:
        console.print(f"no running instance recorded in {record_path()}", highlight=False, soft_wrap=True)
        return
    killed = f" (killed after 5 s without stopping: {', '.join(rec['killed'])})" if rec.get("killed") else ""
    console.print(f"stopped the local Ray instance at {rec['address']}{killed}", highlight=False, soft_wrap=True)


def main(argv: Optional[list[str]] = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reports read artifacts quietly
    try:
        app(args=argv, standalone_mode=False)
    except InputError as e:
        from rich.markup import escape

        text = f"{e.where}: {e.message}" if e.where else str(e)
        console.print(f"[bold red]error[/]: {escape(text)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # usage errors: click's, and those of the click typer vendors (typer._click)
        import click

        if isinstance(e, click.exceptions.ClickException) or (isinstance(e, typer.TyperException)
                                                               and callable(getattr(e, "show", None))):
            e.show()
            sys.exit(2)
        if isinstance(e, (click.exceptions.Abort, typer.Abort)):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()

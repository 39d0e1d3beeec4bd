"""The `taalm` command line."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trainables.errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Continual knowledge learning (TAALM and baselines): runs, tailoring, studies.")
data_app = typer.Typer(no_args_is_help=True, help="LAMA-CKL data: validate, tailor to a model.")
app.add_typer(data_app, name="data")
ray_app = typer.Typer(no_args_is_help=True,
                      help="A local Ray instance kept running between studies (127.0.0.1 only, token authentication): "
                           "studies started without --address and --num-cpus attach to it instead of starting Ray.")
app.add_typer(ray_app, name="ray")
console = Console(stderr=True)

SET_HELP = "Override a config key: dotted.key=value (repeatable)."
NUM_GPUS_HELP = ("GPUs of a new local Ray instance (default: detected; given: the study starts its own). On a machine without GPUs a number declares "
                 "logical GPUs: trials are placed on them as on real ones and run on the CPU, saying so.")
ADDRESS_HELP = ("Attach to a running Ray cluster (auto, HOST:PORT, ray://...); `local`: a new local instance. Default: "
                "the instance `taalm ray start` keeps running, if any, else a new local one.")
NUM_CPUS_HELP = "CPUs of a new local Ray instance (given: the study starts its own, even when `taalm ray start` runs)."
VERBOSE_HELP = "Show Ray's, Tune's and MLflow's own output too (always in <study>/logs/study.log)."


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


UI_PORT = 5000  # `taalm ui`'s default port


def _ui_base(uri: str, host: str = "127.0.0.1", port: int = UI_PORT) -> str:
    """Where the MLflow UI of a study's store is: the tracking server itself for an http(s) store, else the
    server `taalm ui` starts."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://{host}:{port}"


def _study_links(study_dir: Path, base: str) -> Optional[tuple[str, str, int]]:
    """(the study's trials view URL, MLflow's compare URL of its trials, number of trials) under ``base``; the
    view is saved first if the study has none yet (studies run before views existed). None when the study's
    experiment is not in its store."""
    from mlflow.tracking import MlflowClient

    from orchestrator.mlflow_views import (DEFAULT_ORDER, compare_url, ensure_trials_view, trial_runs,
                                           trials_view_url)
    from orchestrator.specs import StudyRecord

    record = StudyRecord.read(study_dir)
    client = MlflowClient(record.tracking_uri)
    exp = client.get_experiment_by_name(record.name)
    if exp is None:
        return None
    ensure_trials_view(client, exp.experiment_id, record)
    order = DEFAULT_ORDER.get(record.protocol, DEFAULT_ORDER["lama_ckl"])
    runs = trial_runs(client, exp.experiment_id, order)
    return (trials_view_url(base, exp.experiment_id), compare_url(base, exp.experiment_id, [x.info.run_id for x in runs]),
            len(runs))


def _view_line(study_dir: Path, uri: str) -> str:
    """The line naming the study's trials view in the MLflow UI (`taalm ui` serves a local store on port 5000 by
    default); the view is saved now if the study has none yet, so do this before the report goes onto the study
    run (its description links the view)."""
    from mlflow.exceptions import MlflowException

    try:
        links = _study_links(study_dir, _ui_base(uri))
    except (MlflowException, OSError, ValueError) as e:
        return f"no saved view of the trials in MLflow ({e})"
    if links is None:
        return ""
    how = "" if uri.startswith(("http://", "https://")) else f" (with `taalm ui {study_dir}`)"
    return f"trials in the MLflow UI{how}: {links[0]}"


def _sqlite_store(study_dir: Path) -> Optional[str]:
    """The study's sqlite MLflow store file, if that is its store (to name it when a write to it is refused)."""
    from orchestrator.specs import StudyRecord

    try:
        uri = StudyRecord.read(study_dir).tracking_uri
    except (InputError, OSError):
        return None
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


def _report_study(r: dict) -> None:
    """Build the study's report from MLflow, print the table and where everything is."""
    from orchestrator.report import write_report

    view = _view_line(Path(r["study_dir"]), r["tracking_uri"])
    rep = write_report(r["tracking_uri"], r["experiment"], Path(r["study_dir"]) / "report", r.get("baseline"))
    print(rep["markdown"])
    console.print(f"study {r['study_dir']} ({r['trials']} trials, {r['failed']} failed); MLflow {r['tracking_uri']}; "
                  f"`taalm ui {r['study_dir']}` to browse", highlight=False, soft_wrap=True)
    if view:
        console.print(view, highlight=False, soft_wrap=True)


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
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
):
    """Run an ablation grid: every trial under Ray Tune (Ray Train for multi-worker trials), tracked in MLflow;
    then the table."""
    from orchestrator.grid import load_grid

    spec, trials, meta = load_grid(grid, set_)  # validated before Ray or MLflow start
    console.print(f"[bold]{spec.name}[/]: {len(trials)} trials ({len({t.label for t in trials})} methods x "
                  f"{len(spec.seeds)} seeds){' + meta-training stage' if meta else ''}", highlight=False)
    from orchestrator.study import run_ablation

    with study_console(spec.name) as progress, study_stops(out / spec.name, verbose, progress):
        r = run_ablation(grid, set_, out, address, tracking_uri, progress=progress, num_cpus=num_cpus,
                         num_gpus=num_gpus, retrain_phi=retrain_phi, verbose=verbose)
    _report_study(r)


@app.command()
def tune(
    space: Path = typer.Argument(..., help="Search space (YAML)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a search-space key: dotted.key=value."),
    out: Path = typer.Option(Path("runs"), "--out", help="Root of study directories (OUT/<name>/)."),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri"),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help=NUM_CPUS_HELP),
    num_gpus: Optional[float] = typer.Option(None, "--num-gpus", min=0, help=NUM_GPUS_HELP),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
):
    """Search hyper-parameters with Optuna under Ray Tune (TPE; NSGA-II for two objectives; optional ASHA)."""
    from orchestrator.search import load_search

    spec, _ = load_search(space, set_)  # validated before Ray or MLflow start
    console.print(f"[bold]{spec.name}[/]: {spec.num_samples} trials, objectives "
                  f"{', '.join(o.metric + ' ' + o.mode for o in spec.objectives)}", highlight=False)
    from orchestrator.search import run_search

    with study_console(spec.name) as progress, study_stops(out / spec.name, verbose, progress):
        r = run_search(space, set_, out, address, tracking_uri, progress=progress, num_cpus=num_cpus,
                       num_gpus=num_gpus, verbose=verbose)
    _report_study(r)


@app.command()
def resume(
    study: Path = typer.Argument(..., help="A study directory (OUT/<name>) of an interrupted `taalm ablate`."),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help=NUM_CPUS_HELP),
    num_gpus: Optional[float] = typer.Option(None, "--num-gpus", min=0, help=NUM_GPUS_HELP),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
):
    """Resume an interrupted study (a grid or a search): finished trials are kept, the others continue from their
    checkpoints."""
    from orchestrator.specs import StudyRecord

    s = StudyRecord.read(study)
    if not s.source or not s.out_root:
        raise InputError(str(study / "study.json"), "this study's record names no grid or search file to resume")
    with study_console(s.name) as progress, study_stops(study, verbose, progress):
        if s.kind == "grid":
            from orchestrator.study import run_ablation

            r = run_ablation(s.source, s.overrides, s.out_root, address, s.tracking_uri, progress=progress,
                             num_cpus=num_cpus, num_gpus=num_gpus, resume=True, verbose=verbose)
        else:
            from orchestrator.search import run_search

            r = run_search(s.source, s.overrides, s.out_root, address, s.tracking_uri, progress=progress,
                           num_cpus=num_cpus, num_gpus=num_gpus, verbose=verbose, resume=True)
    _report_study(r)


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
):
    """Build the table (Markdown, CSV, Parquet), paired differences, curves and Pareto plot from MLflow."""
    from orchestrator.report import write_report
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
    rep = write_report(*sources[0], out or studies[0] / "report", baseline, more=sources[1:], epochs=epochs)
    print(rep["markdown"])
    console.print(f"-> {rep['dir']}/ (table.md, table.csv, table.parquet, trials.parquet, paired.csv, curves.png, "
                  f"pareto.png)", highlight=False, soft_wrap=True)
    for line in filter(None, views):
        console.print(line, highlight=False, soft_wrap=True)


@app.command()
def ui(
    study: Path = typer.Argument(..., help="A study directory."),
    port: int = typer.Option(UI_PORT, help="Port on 127.0.0.1."),
    host: str = typer.Option("127.0.0.1", help="Bind address (loopback by default)."),
):
    """Start the MLflow UI on the study's tracking store (127.0.0.1 unless told otherwise) and print where the study
    opens: its trials (a saved view: summary metrics, the grid's axes and the seed as the first columns, best Top
    Acc first) and MLflow's comparison of them, both in the Model-training mode. The server's own output (uvicorn's
    request log) goes to <study>/logs/study.log."""
    from mlflow.exceptions import MlflowException

    from orchestrator.report import study_tracking

    uri, name = study_tracking(study)
    remote = uri.startswith(("http://", "https://"))
    if not remote:
        _check_listen(host, port)  # before anything is written (the view of an older study, the server log)
    base = _ui_base(uri, host, port)
    try:
        links, why = _study_links(study, base), f"no experiment named {name} in {uri} yet"
    except (MlflowException, OSError, ValueError) as e:  # e.g. a read-only store: the UI still serves it
        links, why = None, f"no links to the study's trials: {e}"
    if remote:  # the study's store is an MLflow server: its UI is there, nothing to start
        console.print(f"Study {name} is tracked on the MLflow server {uri}: its UI is there", highlight=False,
                      soft_wrap=True)
    else:
        console.print(f"MLflow UI on {base} for {uri} (server log: {study / 'logs' / 'study.log'})",
                      highlight=False, soft_wrap=True)
    if links is None:
        console.print(f"({why})", highlight=False, soft_wrap=True)
    else:
        view, compare, n = links
        console.print(f"Study {name}: {view}", highlight=False, soft_wrap=True)
        if n:
            console.print(f"Compare {name} ({n} trials): {compare}", highlight=False, soft_wrap=True)
    if remote:
        return
    # no job runner: its seven huey consumers serve GenAI features (scorers, issue detection) a study has no use
    # for, and on two cores they slow the server's start and stop (set the variable to true to have them)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
                                                                               "false")}
    code = serve_until_signalled([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
                                  "--port", str(port), "--workers", "1"], env=env, log=study / "logs" / "study.log")
    # sys.exit, not typer.Exit: main() runs typer with standalone_mode=False, where click returns typer.Exit's code
    # instead of exiting with it (a failed server used to end `taalm ui` with 0)
    sys.exit(code)


def _check_listen(host: str, port: int) -> None:
    """The server could listen on host:port now (bound as uvicorn binds, with SO_REUSEADDR), else bad input naming
    the option (mlflow server itself only logs the error and exits with 0)."""
    import errno
    import socket

    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise InputError("--host", f"{host!r} is not an address to listen on ({e})") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise InputError("--port", f"{host}:{port} is in use (another server listens there): choose "
                                           f"another --port") from None
            raise InputError("--host", f"cannot listen on {host}:{port}: {e.strerror}") from None


def serve_until_signalled(cmd: list[str], grace_s: float = 20.0, env: Optional[dict] = None,
                          log: Optional[Path] = None) -> int:
    """Run a server in its own process group; SIGTERM / SIGINT to us are forwarded to the whole group
    (mlflow server starts a uvicorn worker of its own) and we wait for it, so a process manager's `kill`
    leaves no child behind and the port free. ``log``: the server's stdout and stderr are appended there instead
    of the console. A server that stops by itself (not signalled) is an error: the end of what it wrote is shown
    and the exit code is never 0."""
    import os
    import signal
    import subprocess
    import time

    out, offset = None, 0
    if log is not None:
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            out = open(log, "ab")
            out.write(f"---- {time.strftime('%Y-%m-%d %H:%M:%S')} taalm ui: {' '.join(cmd)}\n".encode())
            out.flush()
            offset = out.tell()
        except OSError as e:  # a read-only study directory: the server's output stays on the console
            console.print(f"(server output on the console: cannot write {log}: {e})", highlight=False)
            out = None
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
    stopping = []  # monotonic time of the first SIGTERM / SIGINT

    def forward(signum, _frame):
        stopping.append(time.monotonic())
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:  # short waits: a signal during a wait restarts it, the grace period is checked here
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stopping and time.monotonic() - stopping[0] > grace_s:  # part of the server ignored SIGTERM
                    os.killpg(proc.pid, signal.SIGKILL)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        try:  # anything of the group still alive (the server's own workers)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if out is not None:
            out.close()
    if stopping:
        return 0
    # the server stopped by itself (mlflow server exits 0 even when its port is taken): say why
    if out is not None:
        from rich.markup import escape

        tail = log.read_bytes()[offset:].decode(errors="replace").strip().splitlines()[-12:]
        console.print(f"[bold red]error[/]: the server stopped by itself (exit code {code}); the end of its output "
                      f"({log}):", highlight=False, soft_wrap=True)
        for line in tail:
            console.print(escape(line), highlight=False, soft_wrap=True)
    return code or 1


def _fmt(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.4f}"


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

"""The `mlflow server` a study's UI runs on (`taalm ui`): checked before it starts, supervised while it runs.

A server in its own process group whose signals are forwarded to the whole group, so a process manager's `kill`
leaves no child behind and the port free; a server that stops by itself is an error with the end of its output.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

from trainables.errors import InputError

UI_PORT = 5000  # `taalm ui`'s default port


def ui_base(uri: str, host: str = "127.0.0.1", port: int = UI_PORT) -> str:
    """Where the MLflow UI of a study's store is: the tracking server itself for an http(s) store, else the
    server `taalm ui` starts."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://{host}:{port}"


def check_listen(host: str, port: int) -> None:
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
                          log: Optional[Path] = None, say: Callable[..., None] = print) -> int:
    """Run a server in its own process group; SIGTERM / SIGINT to us are forwarded to the whole group
    (mlflow server starts a uvicorn worker of its own) and we wait for it, so a process manager's `kill`
    leaves no child behind and the port free. ``log``: the server's stdout and stderr are appended there instead
    of the console. A server that stops by itself (not signalled) is an error: the end of what it wrote is shown
    and the exit code is never 0. ``say``: how a line is shown (the CLI's console)."""
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
            say(f"(server output on the console: cannot write {log}: {e})")
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
        say(f"[bold red]error[/]: the server stopped by itself (exit code {code}); the end of its output ({log}):")
        for line in tail:
            say(escape(line))
    return code or 1


def serve_ui(study: Path, host: str, port: int, links: Callable[[Path, str], Optional[tuple[str, str, int]]],
             say: Callable[[str], None]) -> int:
    """`taalm ui`: the MLflow UI on the study's tracking store (127.0.0.1 unless told otherwise), after saying where
    the study opens (``links``: its trials view and compare page under a base URL). A study tracked on an MLflow
    server: its UI is there, nothing starts (0). Returns the exit code."""
    import os

    from mlflow.exceptions import MlflowException

    from .specs import study_tracking

    uri, name = study_tracking(study)
    remote = uri.startswith(("http://", "https://"))
    if not remote:
        check_listen(host, port)  # before anything is written (the view of an older study, the server log)
    base = ui_base(uri, host, port)
    try:
        found, why = links(study, base), f"no experiment named {name} in {uri} yet"
    except (MlflowException, OSError, ValueError) as e:  # e.g. a read-only store: the UI still serves it
        found, why = None, f"no links to the study's trials: {e}"
    if remote:
        say(f"Study {name} is tracked on the MLflow server {uri}: its UI is there")
    else:
        say(f"MLflow UI on {base} for {uri} (server log: {study / 'logs' / 'study.log'})")
    if found is None:
        say(f"({why})")
    else:
        view, compare, n = found
        say(f"Study {name}: {view}")
        if n:
            say(f"Compare {name} ({n} trials): {compare}")
    if remote:
        return 0
    # no job runner: its seven huey consumers serve GenAI features (scorers, issue detection) a study has no use
    # for, and on two cores they slow the server's start and stop (set the variable to true to have them)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
                                                                               "false")}
    return serve_until_signalled([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                                  host, "--port", str(port), "--workers", "1"], env=env,
                                 log=study / "logs" / "study.log", say=say)

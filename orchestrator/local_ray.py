"""Connecting a study to Ray (:func:`init_ray`), and a local Ray instance that outlives one study: ``taalm ray start`` / ``taalm ray status`` / ``taalm ray stop``.

Starting Ray is the largest part of a study's start-up (its GCS, raylet and agents: ~3 s on 2 cores). ``taalm ray
start`` starts a Ray head on this machine once, with the same guarantees as the instance a study starts for
itself: every Ray server bound to 127.0.0.1 (GCS, raylet, agents; no dashboard UI) and
token authentication on (it also starts Ray's Client server, on 127.0.0.1 too). It records the instance in ``~/.cache/taalm/ray/head.json`` (``TAALM_RAY_HEAD``: another
file). A study started without ``--address`` and without ``--num-cpus`` attaches to the recorded instance when it
is alive and was started from the same environment (the Python, ``PYTHONPATH``, ``TAALM_CACHE`` and project its
worker processes import: they inherit ``taalm ray start``'s environment, not the study's); otherwise the study
starts a new local instance of its own, as without a recorded one. ``taalm ray stop`` stops the recorded
instance: its own processes, never another Ray on the machine (``ray stop`` would stop every one).

The head runs as ``ray start --head --block`` in a session of its own; stopping it is a SIGTERM to that process
and every process under it (then a SIGKILL to whatever of that tree is left after 5 s).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from trainables.errors import InputError

RECORD_ENV = "TAALM_RAY_HEAD"
ROOT = Path(__file__).resolve().parents[1]
READY = "Ray runtime started"


def record_path() -> Path:
    """Where the running head is recorded (``TAALM_RAY_HEAD``, else the cache directory)."""
    if os.environ.get(RECORD_ENV):
        return Path(os.environ[RECORD_ENV])
    from trainables.models import cache_dir

    return cache_dir() / "ray" / "head.json"


def environment() -> dict:
    """What the worker processes of a head import: a study attaches only to a head started with the same."""
    from trainables.models import cache_dir

    return {"python": sys.executable, "pythonpath": os.environ.get("PYTHONPATH", ""),
            "cache": str(cache_dir().resolve()), "root": str(ROOT)}


def read_record() -> Optional[dict]:
    p = record_path()
    try:
        rec = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and {"address", "pid", "num_cpus", "env"} <= set(rec) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_of(rec: dict):
    """The recorded `ray start --block` process, if it is still that process (not a reused pid)."""
    import psutil

    try:
        p = psutil.Process(int(rec["pid"]))
        cmd = p.cmdline()
    except (psutil.Error, ValueError, TypeError):
        return None
    port = str(rec["address"]).rsplit(":", 1)[-1]
    return p if "start" in cmd and "--block" in cmd and port in cmd and p.status() != psutil.STATUS_ZOMBIE else None


def alive(rec: dict) -> bool:
    """The recorded head's process runs and its GCS accepts connections."""
    if _process_of(rec) is None:
        return False
    host, _, port = str(rec["address"]).rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def running_head() -> tuple[Optional[dict], str]:
    """(the recorded head a study of this environment can attach to, or None; why not)."""
    rec = read_record()
    if rec is None:
        return None, f"no local Ray instance recorded in {record_path()} (taalm ray start)"
    if not alive(rec):
        return None, f"the local Ray instance recorded in {record_path()} is not running"
    if rec["env"] != environment():
        differ = sorted(k for k in environment() if rec["env"].get(k) != environment()[k])
        return None, (f"the local Ray instance at {rec['address']} was started from another environment "
                      f"({', '.join(differ)} differ): its workers would import other code or another cache")
    return rec, ""


def _ray_exe() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _ensure_token(env: dict) -> None:
    """Ray's token authentication needs a token; `ray start` does not create one (a new ray.init() does)."""
    token = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if env.get("RAY_AUTH_TOKEN") or token.is_file():
        return
    subprocess.run([_ray_exe(), "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                   timeout=120, check=True)


def head_env() -> dict:
    """The environment of the head (and so of its workers): this one, token authentication on, 127.0.0.1
    allowed as the node address (Ray's single-machine switch, as for the instance a study starts itself)."""
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false")}


def start_head(num_cpus: Optional[int] = None, port: Optional[int] = None, timeout_s: float = 180) -> tuple[dict, bool]:
    """Start (or find) the recorded head; (its record, whether it was started now)."""
    if num_cpus is not None and num_cpus < 1:
        raise InputError("--num-cpus", f"must be >= 1 (got {num_cpus})")
    if port is not None and not 1024 <= port <= 65535:
        raise InputError("--port", f"must be a port number in 1024..65535 (got {port})")
    from trainables.checkpoint import exclusive

    path = record_path()
    with exclusive(path):  # two `taalm ray start` at once: one starts the instance, the other finds it
        rec = read_record()
        if rec is not None and alive(rec):
            return rec, False
        return _start(path, num_cpus, port, timeout_s), True


def _start(path: Path, num_cpus: Optional[int], port: Optional[int], timeout_s: float) -> dict:
    from trainables.checkpoint import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    cpus = num_cpus or os.cpu_count() or 1
    env = head_env()
    _ensure_token(env)
    log = path.with_suffix(".log")
    # Ray's own files of this instance apart from /tmp/ray: a plain ray.init() elsewhere on the machine does not
    # find this instance through /tmp/ray/ray_current_cluster (a short path: Ray's socket names must fit)
    temp = Path("/tmp") / f"taalm-ray-{os.getuid()}-{port}"
    cmd = [_ray_exe(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--num-cpus", str(cpus), "--include-dashboard", "false", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
           # `ray start --head` always starts a Ray Client server (port 10001 unless told): a free one, on 127.0.0.1
           "--ray-client-server-port", str(_free_port()), "--disable-usage-stats", "--temp-dir", str(temp)]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    rec = {"address": f"127.0.0.1:{port}", "pid": proc.pid, "num_cpus": cpus, "env": environment(),
           "log": str(log), "temp_dir": str(temp), "started": time.time()}
    deadline = time.monotonic() + timeout_s
    while READY not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_process_tree(proc.pid)
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"`ray start` did not start a head (exit {proc.poll()}); its output ({log}):\n{tail}")
        time.sleep(0.1)
    write_json_atomic(path, rec)
    return rec


def _gone(p) -> bool:
    import psutil

    try:
        return p.status() == psutil.STATUS_ZOMBIE  # exited; its parent has not collected it yet
    except psutil.NoSuchProcess:
        return True


def _stop_process_tree(pid: int, timeout_s: float = 5) -> list[str]:
    """SIGTERM to ``pid`` (a `ray start --block`) and every process under it; then SIGKILL to what is left after
    ``timeout_s``. A stopped instance keeps nothing, so the grace is short: one that had run Ray Train trials (which
    leave a detached coordinator actor behind) was seen with its GCS, its `ray start` process and one more still
    running 15 s after the SIGTERM (`ray stop` would wait 16 s); otherwise all stop in 2-3 s. Returns the processes
    that had to be killed."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root] + root.children(recursive=True)
    except psutil.Error:
        return []
    for p in tree:  # as `ray stop` does, to every process of the instance (the `--block` process alone can hang)
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(_gone(p) for p in tree):
        time.sleep(0.1)
    killed = []
    for p in tree:
        if not _gone(p):
            try:
                killed.append(f"{p.name()} ({p.pid})")
                p.kill()
            except psutil.Error:
                pass
    try:  # started by this process (the test session's instance): collect it, leave no zombie
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return killed


def stop_head(timeout_s: float = 5) -> Optional[dict]:
    """Stop the recorded head (only its own processes) and forget it; its record (with ``killed``: the processes
    that did not stop on SIGTERM within ``timeout_s``), or None if none ran."""
    rec = read_record()
    if rec is None:
        return None
    proc = _process_of(rec)
    if proc is not None:
        rec["killed"] = _stop_process_tree(proc.pid, timeout_s)
    record_path().unlink(missing_ok=True)
    return rec if proc is not None else None


# ---- connecting a study to Ray ----------------------------------------------------------------------------

LOOPBACK = ("127.0.0.1", "localhost")


def _keep_loopback() -> None:
    """Let Ray use 127.0.0.1 as a node address. Ray rewrites 127.0.0.1 to the machine's outward address
    unless its single-machine switch is set; that switch is read once, at import, so it is set both in the
    environment (for the raylet, workers and job drivers started from here) and in this process."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(address: Optional[str], num_cpus: Optional[int] = None,
             num_gpus: Optional[float] = None) -> str:
    """Connect this process to Ray; returns how, in words.

    * ``address`` a cluster (``auto``, ``host:port``, ``ray://...``): attach to it;
    * no ``address`` and no ``num_cpus``: attach to the local instance ``taalm ray start`` recorded, when it runs
      and was started from this environment (orchestrator/local_ray.py), else as ``"local"``;
    * ``"local"``, or ``num_cpus`` / ``num_gpus`` given: start a new local instance bound to 127.0.0.1 only (GCS,
      raylets, workers; no dashboard), even when another Ray runs on this machine; GPUs given on a machine without
      them are logical (trials are placed on them and run on the CPU, saying so)."""
    import ray

    if ray.is_initialized():
        return "Ray already initialised in this process"
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # save Tune's experiment state every second, so a killed driver loses at most ~1 s of trial states
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # MLflow is the study's record: no Tune CSV/JSON/TensorBoard loggers (they choke on the per-fact lists
    # of each report, and nothing here reads them)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if address and address != "local":
        target = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
        if target.rsplit(":", 1)[0] in LOOPBACK:  # a cluster started with --node-ip-address 127.0.0.1
            _keep_loopback()
        ray.init(address=address, log_to_driver=False)
        return f"Ray cluster {address}"
    head = _attachable_head(address, num_cpus, num_gpus)
    if head is not None and _token_auth_on():
        _keep_loopback()
        ray.init(address=head["address"], log_to_driver=False)
        return f"attached to the local Ray instance at {head['address']} ({head['num_cpus']} CPUs, taalm ray start)"
    _keep_loopback()
    # "local": a new instance even when a `ray start` cluster runs on this machine (ray.init() would join it)
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    return f"a new local Ray instance ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"


def _attachable_head(address: Optional[str], num_cpus: Optional[int], num_gpus: Optional[float]) -> Optional[dict]:
    """The `taalm ray start` head a study attaches to: only without --address / --num-cpus / --num-gpus, and only
    where this process keeps token authentication on (the head has it on)."""
    if address is not None or num_cpus is not None or num_gpus is not None or not _auth_mode_token():
        return None
    return running_head()[0]


def _auth_mode_token() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "token").lower() == "token"


def _token_auth_on() -> bool:
    """Token authentication on in this process, as for a new local instance (ray.init turns it on for those by
    itself, not for an explicit address): the environment variable, and Ray's configuration, read once at import,
    refreshed the way Ray's own ray.init does it (a private call: tests/test_install.py checks it still exists)."""
    from ray import _raylet

    if not _auth_mode_token() or not hasattr(_raylet, "Config"):
        return False  # the user turned authentication off: the head (token on) is not for this process
    os.environ["RAY_AUTH_MODE"] = "token"
    _raylet.Config.initialize("")
    return True


def local_cpus(address: Optional[str], num_cpus: Optional[int], num_gpus: Optional[float] = None) -> Optional[int]:
    """The CPUs of the Ray instance init_ray(address, num_cpus) will use when it is one on this machine (the
    recorded `taalm ray start` head, or a new local instance); None for a cluster. Read before anything starts."""
    import ray

    if num_cpus is not None and num_cpus < 1:
        raise InputError("--num-cpus", f"must be >= 1 (got {num_cpus}): a Ray instance without a CPU runs no trial")
    if ray.is_initialized():  # init_ray will keep this process's instance
        return int(ray.cluster_resources().get("CPU", 0)) or None
    if address and address != "local":
        return None
    head = _attachable_head(address, num_cpus, num_gpus)
    if head is not None:
        return int(head["num_cpus"])
    return num_cpus or os.cpu_count() or 1

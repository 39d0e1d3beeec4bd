"""Faults a machine makes, as the study sees them: a trial's process killed from outside, a node lost, a write
refused by a full or read-only disk.

What this module changes, and why (Ray 2.60, read from the installed source):

* **A killed trial is a failed trial.** Tune's actor manager (``ray/air/execution/_internal/actor_manager.py``,
  ``RayActorManager._actor_task_failed``) knows two kinds of failed actor task: ``RayActorError`` (the actor
  died: Tune cleans it up and fails the trial, which ``FailureConfig.max_failures`` may retry) and
  ``RayTaskError`` (the trial's code raised). Anything else it re-raises as ``RuntimeError("Caught unexpected
  exception")`` and the whole study stops. But a trial process killed by Ray's memory monitor fails its
  running task with ``OutOfMemoryError``, a lost node with ``NodeDiedError``, a crashed worker with
  ``WorkerCrashedError``: all ``RayError`` s that are neither. :func:`install` makes the actor manager read
  every such error as what it is, the death of the trial's actor (:class:`TrialProcessLost`, a
  ``RayActorError`` carrying the original message), so Tune fails the trial, retries it under
  ``max_failures`` from its last checkpoint, and the other trials go on.
* **Ray's own error lines stay off the console.** The driver prints every error the raylet publishes (a worker
  killed, the memory monitor's 30-line report) on stdout, prefixed ``(raylet)``, from a thread of its own
  (``ray._private.worker.listen_error_messages`` -> ``print_to_stdstream``). :func:`install` sends those lines
  to the ``ray`` logger instead (the study log); ``--verbose`` leaves them on the console. The study's console
  says the same in one line per trial (:func:`describe_failure`).

Both patches are checked against the installed Ray by ``tests/test_install.py`` (the names still exist) and by
the fault tests that need them (tests/test_faults.py).

:func:`describe_failure` turns a trial's error text into one line ("killed by Ray's memory monitor: node at 95 %
of 23.5 GB (threshold 95 %)"); :func:`storage_fault` says whether a failure is a write the disk refused (the
study then stops: every other trial would hit the same disk), :func:`study_stop_message` what the CLI prints
when the study cannot go on.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional

from ray.exceptions import RayActorError

from trainables.errors import first_line

_log = logging.getLogger("ray.taalm")


class TrialProcessLost(RayActorError):
    """The trial's actor process is gone (memory monitor, node lost, worker crashed): a ``RayActorError`` for
    Tune, with the original error's type and message."""

    def __init__(self, message: str = "", actor_id: Optional[str] = None):
        super().__init__(actor_id=actor_id, error_msg=message)

    @classmethod
    def from_cause(cls, cause: BaseException) -> "TrialProcessLost":
        return cls(f"{type(cause).__name__}: {cause}")


def _is_process_loss(exc: BaseException) -> bool:
    from ray.exceptions import RayError, RayTaskError

    return isinstance(exc, RayError) and not isinstance(exc, (RayTaskError, RayActorError))


def _patch_actor_manager() -> None:
    from ray.air.execution._internal.actor_manager import RayActorManager

    original = RayActorManager._actor_task_failed
    if getattr(original, "_taalm_patched", False):
        return

    def _actor_task_failed(self, tracked_actor_task, exception):
        if _is_process_loss(exception):  # the actor's process died: Tune's own handling of a dead actor
            exception = TrialProcessLost.from_cause(exception)
        return original(self, tracked_actor_task, exception)

    _actor_task_failed._taalm_patched = True
    _actor_task_failed.__wrapped__ = original
    RayActorManager._actor_task_failed = _actor_task_failed


_VERBOSE = {"on": False}


def _patch_error_printer() -> None:
    import ray._private.worker as worker

    original = worker.print_to_stdstream
    if getattr(original, "_taalm_patched", False):
        return

    def print_to_stdstream(data, ignore_prefix: bool):
        if data.get("pid") in ("raylet", "autoscaler") and not _VERBOSE["on"]:
            for line in data.get("lines", []):
                _log.warning("(%s) %s", data.get("pid"), line)
            return
        return original(data, ignore_prefix)

    print_to_stdstream._taalm_patched = True
    print_to_stdstream.__wrapped__ = original
    worker.print_to_stdstream = print_to_stdstream


def install(verbose: Optional[bool] = None) -> None:
    """In the study's driver, before Tune runs: dead trial processes fail their trial (not the study), and
    Ray's error lines go to the study log (on the console too with ``verbose``; None: as set before).
    Idempotent."""
    if verbose is not None:
        _VERBOSE["on"] = bool(verbose)
    _patch_actor_manager()
    _patch_error_printer()


# ---- one line per failure ------------------------------------------------------------------------------------

_MONITOR = re.compile(r"was ([\d.]+)GB used / ([\d.]+)GB limit \(([\d.]+)\)")
_THRESHOLD = re.compile(r"threshold of \d+B \(([\d.]+)% of")
_KILLED = re.compile(r"Selected to kill:.*?pid=(\d+), actual memory used=([\d.]+)GB", re.S)
_PID = re.compile(r"^\s*pid: (\d+)", re.M)
_NODE = re.compile(r"(?:[Nn]ode [Ii][Dd]|node_id)[:= ]+([0-9a-f]{8,})")


def last_failure(text: str) -> str:
    """Tune appends every failure of a trial to its error file (``Failure # N (occurred at ...)``): the last."""
    parts = re.split(r"^Failure # \d+ \(occurred at [^)]*\)\s*$", text or "", flags=re.M)
    return parts[-1].strip() if parts else ""


def error_line(text: str) -> str:
    """The last 'SomeError: message' line of an error's text (a traceback; or the tail of the text)."""
    text = text or "trial raised an error"
    found = re.findall(r"^\s*([A-Za-z_.]*(?:Error|Exception|Interrupt)\b[^\n]*)$", text, flags=re.M)
    return (found[-1].strip() if found else text.strip().splitlines()[-1])[:500]


def failure_reason(trial) -> str:
    """One line saying why a Tune trial failed (its last failure), from the error file Tune writes next to the
    trial before it calls the callbacks: the node it ran on lost (:func:`lost_node`), else :func:`describe_failure`."""
    text = ""
    try:
        if trial.error_file and Path(trial.error_file).is_file():
            text = Path(trial.error_file).read_text()
    except OSError:
        pass
    key = (getattr(trial, "trial_id", None), len(text))  # the console and the MLflow callback ask in turn
    if _REASONS.get("key") != key:
        node = lost_node(trial, last_failure(text))
        _REASONS.update(key=key, reason=node if node is not None else describe_failure(text))
    return _REASONS["reason"]


_REASONS: dict = {}  # the last trial failure read (failure_reason)


# what Ray says when the node an actor ran on went away (its raylet gone: the node died or was cut off)
_NODE_GONE = ("NodeDiedError", "node has died", "rpc_code: 14", "Socket closed", "ActorUnavailableError")


def lost_node(trial, text: str, wait_s: float = 15.0) -> Optional[str]:
    """'node 10.0.0.3 lost (its processes died)' when the trial's failure is the loss of the node it ran on (the
    node its last report came from is dead in Ray's records, or Ray's error says the node or its connection went
    away and Ray marks the node dead within ``wait_s``); None otherwise."""
    import time

    node_id = (getattr(trial, "last_result", None) or {}).get("node_id")
    if not node_id:
        return None
    signs = any(s in text for s in _NODE_GONE)
    deadline = time.monotonic() + (wait_s if signs else 0.0)
    while True:
        try:
            import ray

            node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), None)
        except Exception:  # noqa: BLE001 (no Ray connection: nothing to say)
            return None
        if node is None:
            return None
        ip = node.get("NodeManagerAddress") or node_id[:12]
        if not node.get("Alive"):
            return f"node {ip} lost (its processes died)"
        if time.monotonic() >= deadline:
            return f"node {ip} unreachable (Ray's connection to it closed)" if signs else None
        time.sleep(0.5)


def retry_line(trial, reason: str) -> str:
    """The reason a retried trial gives, with where it continues when its node was lost."""
    if not reason.startswith("node ") or " lost " not in reason:
        return reason
    last = getattr(trial, "last_result", None) or {}
    index, unit = last.get("index"), {"check": "step", "period": "period"}.get(last.get("kind"), "epoch")
    return reason + (f"; resumed from {unit} {int(index)} on another node" if isinstance(index, (int, float))
                     else "; started again on another node")


def describe_failure(text: str) -> str:
    """One line saying why a trial failed, from its error text: what killed its process when something did
    (Ray's memory monitor, a lost node, a signal or the kernel), else the error's last ``SomeError: message``
    line (:func:`error_line`)."""
    text = last_failure(text)
    m = _MONITOR.search(text)
    if m and ("memory monitor" in text or "low on memory" in text or "OutOfMemoryError" in text):
        used, limit, frac = float(m.group(1)), float(m.group(2)), float(m.group(3))
        t = _THRESHOLD.search(text)
        k = _KILLED.search(text)
        line = f"killed by Ray's memory monitor: node at {frac * 100:.0f} % of {limit:.1f} GB ({used:.1f} GB used"
        line += f", threshold {float(t.group(1)):.0f} %)" if t else ")"
        if k:
            line += f"; the trial's process (pid {k.group(1)}) used {float(k.group(2)):.2f} GB"
        return line
    if "NodeDiedError" in text or "its node has died" in text or "node has died" in text.lower():
        n = _NODE.search(text)
        return "the node running the trial was lost" + (f" (node {n.group(1)[:12]})" if n else "") + \
            ": the trial runs again elsewhere when retries are left (resources.max_failures)"
    if "WorkerCrashedError" in text or ("actor died" in text.lower() and "worker process has died" in text):
        p = _PID.search(text)
        who = f"the trial's process (pid {p.group(1)})" if p else "the trial's process"
        return (f"{who} died unexpectedly: killed from outside (SIGKILL, the kernel's OOM killer) or crashed "
                f"(SIGSEGV); see the study log")
    # "trainables.checkpoint.StorageError: ..." -> "StorageError: ..." (the class says it; the module does not)
    return re.sub(r"^(?:[a-z_]\w*\.)+(?=[A-Z]\w*(?:Error|Exception)\b)", "", error_line(text))


# ---- injected faults (a testing hook) ---------------------------------------------------------------------------

FAULT_ENV = "TAALM_INJECT_FAULT"


def injected_faults(labels: Optional[list[str]]) -> dict[Optional[str], int]:
    """Fault injection for checking retries before a long study (a testing hook, off by default).

    ``TAALM_INJECT_FAULT=INDEX`` (every trial) or ``INDEX:LABEL[,INDEX:LABEL...]`` makes a trial's first
    attempt crash at its first step after the report of INDEX (an epoch; a meta-training trial's meta-step; a
    TemporalWiki period) was checkpointed; a retry (``resources.max_failures``) restores that checkpoint and goes
    on without the fault. Read once in the driver, at study start. ``labels`` None: a search, whose trials are
    not known in advance: only ``INDEX`` (every trial), returned under the key None."""
    from trainables.errors import InputError

    raw = os.environ.get(FAULT_ENV, "").strip()
    out: dict[Optional[str], int] = {}
    for item in filter(None, (x.strip() for x in raw.split(","))):
        index, _, label = item.partition(":")
        if labels is None:
            if not index.isdigit() or label:
                raise InputError(f"{FAULT_ENV}={raw}", "expected INDEX (a search's trials have no labels in advance)")
            out[None] = int(index)
            continue
        if not index.isdigit() or (label and label not in labels):
            raise InputError(f"{FAULT_ENV}={raw}", f"expected INDEX or INDEX:LABEL with a label of this study "
                                                    f"({', '.join(sorted(set(labels)))})")
        for name in ([label] if label else labels):
            out[name] = int(index)
    return out


# ---- a stage asked to stop (a refused write): what the console says of the trials it stops ------------------

_STOP: dict = {}


def request_stop(reason: Optional[str]) -> None:
    """The running stage is stopping for ``reason`` (orchestrator/tuning.py's guard; None: a new stage)."""
    _STOP["reason"] = reason


def stopping() -> Optional[str]:
    """Why the running stage is stopping (a refused write), or None."""
    return _STOP.get("reason")


# ---- writes the disk refuses ---------------------------------------------------------------------------------

_DISK_TEXT = ("No space left on device", "Read-only file system", "Disk quota exceeded", "File too large",
              "database or disk is full", "attempt to write a readonly database", "disk I/O error")
_SQLITE_TEXT = _DISK_TEXT[-3:]  # SQLite's words for a write the disk refused (full, read-only, an I/O error)


def storage_fault(reason: str) -> bool:
    """Whether a trial's failure is a write the disk refused (full, read-only, quota): nothing a retry fixes."""
    return "StorageError" in reason or any(t in reason for t in _DISK_TEXT)


def disk_error(exc: BaseException) -> Optional[BaseException]:
    """The write error in an exception's chain (``__cause__`` / ``__context__``, Tune wraps what its callbacks
    raise), if it is one: an OSError with a disk errno, a StorageError, or SQLite's "disk is full" /
    "readonly database"."""
    from trainables.checkpoint import DISK_ERRNOS

    return next((e for e in _chain(exc) if type(e).__name__ == "StorageError"
                 or (isinstance(e, OSError) and e.errno in DISK_ERRNOS) or any(t in str(e) for t in _SQLITE_TEXT)), None)


def describe_disk_error(exc: BaseException, fallback_path: Optional[str] = None) -> str:
    """'cannot write PATH: WHAT (N GB free on MOUNT)' for a refused write."""
    from trainables.checkpoint import free_space, storage_error

    if type(exc).__name__ == "StorageError":
        return str(exc)
    if isinstance(exc, OSError):
        path = exc.filename or fallback_path or "?"
        return str(storage_error(exc, str(path), path))
    path = fallback_path or "?"
    what = next((t for t in _SQLITE_TEXT if t in str(exc)), first_line(exc))
    return f"cannot write {path}: {what} ({free_space(path)})"


def study_stop_message(exc: BaseException, study_dir: Path, store: Optional[str] = None) -> str:
    """What the CLI says when Tune itself cannot go on: one line of cause (the disk's, when a write was refused:
    the path and the free space)."""
    disk = disk_error(exc)
    if disk is not None:
        return describe_disk_error(disk, store)
    text = "\n".join(f"{type(e).__name__}: {e}" for e in _chain(exc))
    return describe_failure(text) if text else type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes, innermost last (what Tune wraps: a callback's error, the actor manager's)."""
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


class StudyStopped(Exception):
    """The study stopped before its trials ended (a refused write, an interrupt): everything finished so far is
    kept, and ``taalm resume`` continues it."""

    def __init__(self, reason: str, study_dir: Optional[Path] = None, unfinished: int = 0):
        super().__init__(reason)
        self.reason, self.study_dir, self.unfinished = reason, study_dir, unfinished

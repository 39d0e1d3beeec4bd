"""Checkpoints as safetensors + JSON (never pickle).

A loop checkpoint is a directory with ``trainable.safetensors`` (the trainable parameters),
``optimizer.safetensors`` (optimizer tensors, flattened), ``rng.safetensors`` (torch RNG state) and
``state.json`` (epoch, history, optimizer hyper-parameters, Python RNG, config). It is written into a
temporary directory and renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import InputError, first_line, read_text
from .files import write_bytes_atomic

FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
EXTRA = "extra.safetensors"


def json_safe(x: Any) -> Any:
    """NaN/inf become null so the JSON is standard."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


class StorageError(OSError):
    """A write the disk refused (no space, read-only, a quota or file-size limit), naming the path and the free
    space there: the file it replaces is untouched (writes are atomic), and once there is room the run resumes."""


# errno values of a disk that refuses a write (EPERM: an immutable directory, `chattr +i`)
DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM)


def free_space(path) -> str:
    """'12.3 GB free on DIR' for the nearest existing directory of ``path``."""
    p = Path(path)
    for cand in [p, *p.parents]:
        try:
            if cand.is_dir():
                free = shutil.disk_usage(cand).free
                size = next(f"{free / s:.1f} {u}" for u, s in (("GB", 2 ** 30), ("MB", 2 ** 20), ("KB", 2 ** 10),
                                                               ("B", 1)) if free >= s or u == "B")
                return f"{size} free on {cand}"
        except OSError:
            continue
    return "free space unknown"


def disk_errno(exc: BaseException) -> Optional[int]:
    """The errno of a write the disk refused, or None: ``exc.errno``, or the one a library wrote into its message
    (pyarrow persisting Tune's checkpoint: "[errno N]"; safetensors: "os error N" / "Os { code: N")."""
    import re

    code = getattr(exc, "errno", None)
    if code is None:
        m = re.search(r"\[errno (\d+)\]|os error (\d+)|Os \{ code: (\d+)", str(exc))
        code = int(next(g for g in m.groups() if g)) if m else None
    return code if code in DISK_ERRNOS else None


def storage_error(exc: OSError, what: str, path) -> StorageError:
    """'cannot write WHAT: WHY (N GB free on DIR)'; ``what`` names the path (``{path}`` is filled in)."""
    why = exc.strerror or first_line(exc)
    return StorageError(f"cannot write {what.replace('{path}', str(path))}: {why} ({free_space(path)})")


@contextmanager
def _refused_as_storage_error(what: str, path):
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        if disk_errno(e) is None:
            raise
        raise storage_error(e, what, e.filename or path) from e
    except SafetensorError as e:  # safetensors reports the OS error inside its own: "... (os error 27)"
        code = disk_errno(e)
        if code is None:
            raise
        raise storage_error(OSError(code, os.strerror(code)), what, path) from e


def write_json_atomic(path: Path, obj: Any) -> None:
    with _refused_as_storage_error(str(path), path.parent):
        write_bytes_atomic(path, (json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n").encode())


@contextmanager
def exclusive(path: Path):
    """Hold an exclusive lock on ``<path>.lock`` (fcntl, across processes of this machine): processes that would
    all build the same cache entry (the first trials of a study, started together) build it once; the others
    wait, then find it."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / (path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


@contextmanager
def atomic_directory(directory: Path):
    """Yield a temporary sibling directory; on success it replaces ``directory`` (never half-written). A write the
    disk refuses is a :class:`StorageError` naming the directory and the free space; ``directory`` is left as it
    was."""
    directory = Path(directory)
    with _refused_as_storage_error(str(directory), directory.parent):
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp", dir=directory.parent))
        try:
            yield tmp
            old = directory.with_name(directory.name + ".old")
            if directory.exists():
                os.replace(directory, old)
            try:
                os.replace(tmp, directory)
            except OSError:
                if old.exists() and not directory.exists():
                    os.replace(old, directory)  # put the previous version back
                raise
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu().clone()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    """torch's CPU generator, and every CUDA device's when CUDA is in use (dropout on a GPU draws from those)."""
    out = {"torch": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda_{i}"] = st
    return out


def set_rng_state(rng: dict[str, torch.Tensor]) -> None:
    torch.random.set_rng_state(rng["torch"])
    cuda = sorted((int(k[5:]), v) for k, v in rng.items() if k.startswith("cuda_"))
    if cuda and torch.cuda.is_available() and len(cuda) <= torch.cuda.device_count():
        for i, st in cuda:
            torch.cuda.set_rng_state(st, i)


def save_loop_checkpoint(directory: Path, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                         state: dict, extra: Optional[dict[str, torch.Tensor]] = None) -> None:
    """``extra``: more tensors a loop keeps (meta-training: the best φ so far), in ``extra.safetensors``."""
    with atomic_directory(directory) as tmp:
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in trainable.items()}, str(tmp / FILES[0]))
        if extra is not None:
            save_file({k: v.detach().contiguous().cpu().clone() for k, v in extra.items()}, str(tmp / EXTRA))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, str(tmp / FILES[1]))
        save_file(rng_state(), str(tmp / FILES[2]))
        py_state = random.getstate()
        full = dict(state, optimizer=opt_meta, python_rng=[py_state[0], list(py_state[1]), py_state[2]])
        with open(tmp / FILES[3], "w") as fh:
            json.dump(json_safe(full), fh, indent=1, allow_nan=False)


def load_loop_checkpoint(directory: Path, trainable: dict[str, torch.nn.Parameter],
                         optimizer: torch.optim.Optimizer) -> dict:
    """Restore parameters, optimizer and RNG in place; return the JSON state."""
    directory = Path(directory)
    for f in FILES:
        if not (directory / f).is_file():
            raise InputError(str(directory / f), "checkpoint file missing")
    try:
        params = load_file(str(directory / FILES[0]))
        opt_tensors = load_file(str(directory / FILES[1]))
        rng = load_file(str(directory / FILES[2]))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(str(directory), f"corrupt checkpoint: {e}") from None
    try:
        state = json.loads(read_text(directory / FILES[3]))
    except json.JSONDecodeError as e:
        raise InputError(f"{directory / FILES[3]}:{e.lineno}", f"corrupt checkpoint state: {e.msg}") from None
    if set(params) != set(trainable):
        raise InputError(str(directory / FILES[0]),
                         "checkpoint parameters do not match the model's trainable parameters")
    with torch.no_grad():
        for k, p in trainable.items():
            if params[k].shape != p.shape:
                raise InputError(str(directory / FILES[0]), f"shape mismatch for {k}")
            p.copy_(params[k])
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state.pop("optimizer")))
    set_rng_state(rng)
    py = state.pop("python_rng")
    random.setstate((py[0], tuple(py[1]), py[2]))
    return state


def load_extra(directory: Path) -> dict[str, torch.Tensor]:
    """The ``extra`` tensors of a loop checkpoint (see :func:`save_loop_checkpoint`)."""
    path = Path(directory) / EXTRA
    if not path.is_file():
        raise InputError(str(path), "checkpoint file missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(str(path), f"corrupt checkpoint: {e}") from None

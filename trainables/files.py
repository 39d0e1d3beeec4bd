"""A file that appears whole or not at all (no heavy imports: the report and the storage use it too)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling renamed over it: a reader sees the old file or the new
    one, never part of it; a write cut short (a full disk, a kill between the two) leaves no temporary file behind
    (a kill of the process itself may leave one, named ``<name>.<random>.tmp``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

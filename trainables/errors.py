"""Errors about the user's input: they carry a location and map to exit code 2."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input (config, data file, checkpoint...).

    ``where`` names the place: ``file:line``, ``file:line (key.path)`` or a dotted config key path.
    """

    def __init__(self, where: str, message: str):
        self.where = where
        self.message = message
        # both arguments in ``args``: copy.copy and pickle rebuild the error as cls(*args) (Ray copies an error on
        # its way from a trial to the driver; with one argument the copy failed and the message was lost)
        super().__init__(where, message)

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


def first_line(error, limit: int = 200) -> str:
    """The first line of an exception's message (or of a text), at most ``limit`` characters; '' for an empty one."""
    return (str(error).splitlines() or [""])[0][:limit]


def read_text(path) -> str:
    """A file the user gave us, decoded as UTF-8; a file that is not UTF-8 text (a binary passed by
    mistake, a Latin-1 export) is an InputError naming the file, the line and the byte offset."""
    from pathlib import Path

    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}:{line}", f"not UTF-8 text: byte {e.start} is 0x{raw[e.start]:02x} "
                                           "(save the file as UTF-8, or check that it is the file you meant)"
                         ) from None

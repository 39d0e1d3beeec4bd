"""Errors about the user's input: they carry a location and map to exit code 2."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input (config, data file, checkpoint...).

    ``where`` names the place: ``file:line``, ``file:line (key.path)`` or a dotted config key path.
    """

    def __init__(self, where: str, message: str):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)

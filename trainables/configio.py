"""Configs as files: YAML with the line of every key, ``--set dotted.key=value`` overrides, and validation against a
pydantic schema whose first error becomes an :class:`~trainables.errors.InputError` naming ``file:line (key.path)``
or ``--set key`` (trainables/config.py holds the schema and ``load_config``, the one entry point)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import InputError, read_text


class ConfigKeyError(ValueError):
    """A validation error about a key other than the one being validated (a model-level rule): ``loc`` is that
    key's path, so the message names it with its file:line or --set."""

    def __init__(self, loc: tuple, message: str):
        super().__init__(loc, message)  # both in ``args``: copy and pickle rebuild it (trainables/errors.py)
        self.loc, self.message = loc, message

    def __str__(self) -> str:
        return self.message


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records the line of every mapping key, by key path."""


def _compose_lines(node: yaml.Node, path: tuple, lines: dict, file: str = "") -> None:
    """Record the line of every key; a key given twice in one mapping is an error naming both lines
    (YAML loaders keep the last one silently)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for k, v in node.value:
            key = k.value
            line = k.start_mark.line + 1
            if key in seen and key != "<<":
                dotted = ".".join(str(x) for x in path + (key,))
                raise InputError(f"{file}:{line} ({dotted})",
                                 f"duplicate key {key!r}: also at line {seen[key]} (a YAML mapping takes each key once)")
            seen[key] = line
            lines[path + (key,)] = line
            _compose_lines(v, path + (key,), lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            lines[path + (i,)] = v.start_mark.line + 1
            _compose_lines(v, path + (i,), lines, file)


def load_yaml(path: str | Path) -> tuple[dict, dict]:
    """Load a YAML mapping safely; return (data, {key path tuple: line})."""
    p = Path(path)
    if not p.is_file():
        raise InputError(str(p), "no such file")
    text = read_text(p)
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise InputError(where, f"YAML syntax error: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{p}:1", "the file must hold a YAML mapping (key: value lines)")
    lines: dict = {}
    if node is not None:
        _compose_lines(node, (), lines, str(p))
    return data, lines


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys ({"train": {"lr": 1}} -> {"train.lr": 1}); lists stay values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(data: dict, overrides: list[str] | None) -> set[tuple]:
    """Apply ``dotted.key=value`` overrides in place; values are parsed as YAML scalars/lists."""
    touched: set[tuple] = set()
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"--set {item}", "expected dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise InputError(f"--set {item}", "empty key component")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise InputError(f"--set {item}", f"cannot parse value: {e}") from None
        cur = data
        for part in parts[:-1]:
            nxt = cur.get(part)
            if nxt is None:
                nxt = cur[part] = {}
            if not isinstance(nxt, dict):
                raise InputError(f"--set {item}", f"{part!r} is not a mapping")
            cur = nxt
        cur[parts[-1]] = value
        touched.add(tuple(parts))
    return touched


def _where(source: str, loc: tuple, lines: dict, touched: set[tuple]) -> str:
    dotted = ".".join(str(x) for x in loc)
    if not source:
        return dotted
    if not loc:
        return source
    for t in touched:
        n = min(len(t), len(loc))
        if n and tuple(t[:n]) == tuple(loc[:n]):
            return f"--set {dotted}"
    for n in range(len(loc), 0, -1):
        if tuple(loc[:n]) in lines:
            return f"{source}:{lines[tuple(loc[:n])]} ({dotted})"
    return f"{source} ({dotted})"


def validate(schema: type[BaseModel], data: dict, source: str = "", lines: dict | None = None,
             touched: set[tuple] | None = None):
    """Validate ``data`` against ``schema``; the first error becomes an :class:`InputError`."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigKeyError):
            err = dict(err, loc=tuple(err["loc"]) + cause.loc)
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith(("function-", "union["))))
        # pydantic adds the branch name (e.g. 'str', 'list[str]') for unions: drop type tags
        loc = tuple(x for x in loc if x not in ("str", "list[str]", "int", "float"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        if len(e.errors()) > 1:
            msg += f" (and {len(e.errors()) - 1} more error(s))"
        raise InputError(_where(source, loc, lines or {}, touched or set()), msg) from None


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")

"""Named registries, one per axis of a CKL method, so YAML can refer to an implementation by name.

A CKL method is a point on four axes (DESIGN.md): parameterisation, token weighting, regulariser, replay.
Each axis is a :class:`Registry` below. A registry names the module that fills it (``home``) and imports
it the first time a name is looked up, so the config schema (``trainables.config``) validates names
against the registries without importing any model code: the schema cannot be part of an import cycle
(torchtune's config resolves its components by dotted path for the same reason).

To add an implementation, subclass the axis's base class in its home module and decorate it with
``@REGISTRY.register("name")``; docs/DESIGN.md walks through it.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from .errors import InputError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, home: str):
        self.kind = kind  # what an entry is, for messages ("replay method")
        self.home = home  # the module whose import registers every entry
        self._items: dict[str, T] = {}
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            importlib.import_module(self.home)
            self._loaded = True

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str, where: str = "") -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise InputError(where, self.unknown(name)) from None

    def unknown(self, name: str) -> str:
        return f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"

    def check(self, name: str) -> str:
        """``name`` if registered, else ValueError listing the known names (for schema validators)."""
        if name not in self:
            raise ValueError(self.unknown(name))
        return name

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items


# the four axes of a CKL method
PARAMETERISATIONS: Registry = Registry("parameterisation", "trainables.params")
SCHEMES: Registry = Registry("weighting scheme", "trainables.weighting")
REGULARIZERS: Registry = Registry("regulariser", "trainables.regularizers")
REPLAYS: Registry = Registry("replay method", "trainables.replay")
# the differentiable optimizers of Train-Attention's inner loop
INNER_OPTIMIZERS: Registry = Registry("inner optimizer", "trainables.functional_optim")

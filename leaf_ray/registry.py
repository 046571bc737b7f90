"""Named extension points: one `Registry` per kind of thing a config key names by string.

An implementation registers itself where it is defined, with the registry's decorator::

    @THRESHOLD_RULES.register("median")
    def median_threshold(delta, cfg) -> float: ...

and a config key typed ``THRESHOLD_RULES.name()`` accepts any registered name: a name nobody registered is an
error at config load that lists the choices. docs/extending.md walks through adding one.

Each registry names its *home*, the module whose import registers the built-ins; the registry imports it (by
name, once) the first time it is asked for its names. That is how `config.py`, at the bottom of the layers
(docs/ARCHITECTURE.md), can check a name without importing the stage packages at `import leaf_ray.config`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator

T = TypeVar("T")


@dataclass(frozen=True)
class RegisteredName:
    """Field metadata of a registered-name config key: the configuration reference lists its choices."""

    registry: Registry
    also: tuple[str, ...] = ()

    def builtins(self) -> list[str]:
        return [*self.also, *self.registry.builtins()]


class Registry(Generic[T]):
    """Names -> implementations of one extension point (`what`), chosen by config key `key`."""

    def __init__(self, what: str, key: str, home: str):
        self.what, self.key, self.home = what, key, home
        self._entries: dict[str, T] = {}
        self._home_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make the decorated function or class the implementation named `name`."""

        def add(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.what} {name!r} is already registered ({self._entries[name]!r})")
            self._entries[name] = obj
            return obj

        return add

    def names(self) -> list[str]:
        self._load_home()
        return sorted(self._entries)

    def builtins(self) -> list[str]:
        """The names its home module registers (what the configuration reference lists)."""
        self._load_home()
        return sorted(n for n, obj in self._entries.items() if getattr(obj, "__module__", None) == self.home)

    def get(self, name: str) -> T:
        self._load_home()
        if name not in self._entries:
            raise ValueError(self.unknown(name))
        return self._entries[name]

    def unknown(self, name: str, also: Iterable[str] = ()) -> str:
        choices = ", ".join([*also, *self.names()])
        return f"unknown {self.what} {name!r}; registered: {choices}"

    def name(self, also: tuple[str, ...] = ()) -> Any:
        """The type of a config field holding one registered name (or one of `also`, e.g. "auto")."""

        def check(value: str) -> str:
            if value not in also and value not in self.names():
                raise ValueError(self.unknown(value, also))
            return value

        return Annotated[str, AfterValidator(check), RegisteredName(self, also)]

    def _load_home(self) -> None:
        if not self._home_loaded:
            importlib.import_module(self.home)  # its decorators register the built-ins
            self._home_loaded = True

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, key={self.key!r}, home={self.home!r})"


PLUGINS_ENV = "LEAF_RAY_PLUGINS"


def import_plugins(modules: Iterable[str] | None = None) -> None:
    """Import the modules that register your own implementations (config key `plugins`). With no argument,
    those named by $LEAF_RAY_PLUGINS: `raycluster.init_ray` makes this every Ray worker's setup hook."""
    names = list(modules) if modules is not None else os.environ.get(PLUGINS_ENV, "").split(",")
    for name in filter(None, names):
        importlib.import_module(name)


THRESHOLD_RULES: Registry[Callable] = Registry(
    "threshold rule", "detection.threshold.rule", home="leaf_ray.detect.confounders")
TEACHER_SIGNALS: Registry[Callable] = Registry(
    "teacher signal", "distill.teacher_mode", home="leaf_ray.distill.engines")
GENERATION_BACKENDS: Registry[type] = Registry(
    "generation backend", "generation.backend", home="leaf_ray.generate.backends")
BENCHMARK_FORMATS: Registry[Any] = Registry(
    "benchmark format", "evaluation.benchmarks[].format", home="leaf_ray.evaluate.benchmarks")

"""A tiny name -> factory registry, the one plug-in point for encoders, methods and data sources."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from fsdiff.errors import FsdiffError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; unknown names raise an FsdiffError listing the known ones."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``factory`` under ``name``."""

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            self._factories[name] = factory
            return factory

        return deco

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        return name in self._factories

    def get(self, name: str) -> Callable[..., T]:
        """The factory for ``name``, or an FsdiffError naming the choices."""
        if name not in self._factories:
            raise FsdiffError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self.names())}.")
        return self._factories[name]

    def build(self, name: str, **kwargs) -> T:
        """Build the object registered under ``name``."""
        return self.get(name)(**kwargs)

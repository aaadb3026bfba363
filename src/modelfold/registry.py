"""Named strategy registries: one place per kind of strategy that says which names exist."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from modelfold.errors import FoldError

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> strategy, with errors that list what is registered.

    `register("name")` is a decorator; `register("name", obj)` registers directly. Registering
    a name again replaces the earlier entry (so a user can override a built-in)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        if not isinstance(name, str) or not name:
            raise FoldError(f"a {self.kind} needs a non-empty string name, got {name!r}.")

        def add(value: T) -> T:
            self._entries[name] = value
            return value

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise FoldError(f"unknown {self.kind} {name!r}; registered: {self.names()}.")
        return self._entries[name]

    def unregister(self, name: str) -> None:
        """Remove `name` (a no-op when it is not registered)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

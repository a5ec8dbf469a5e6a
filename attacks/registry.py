"""A name -> class registry shared by the attack kinds (evasion attacks, triggers, backdoors, MIAs, defences)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes registered under names; ``get`` fails with the config key and the allowed names."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator adding an entry under ``name`` (and setting its ``name`` attribute)."""

        def wrap(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.key}: {name!r} registered twice")
            entry.name = name  # type: ignore[attr-defined]
            self._entries[name] = entry
            return entry

        return wrap

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"{self.key}: unknown value {name!r}; allowed: {', '.join(self._entries)}") from None

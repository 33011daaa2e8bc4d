"""Named registries: the selection strategies and the fine-tuning methods are looked up by the name a config gives."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, filled once by ``@registry.register(name)``; a name can be registered only once.

    Args:
        kind: What the entries are ("strategy", "method"), for error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers its argument under ``name``.

        Raises:
            ValueError: If ``name`` is already registered (a second registration would silently replace the first).
        """

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
            self._entries[name] = entry
            return entry

        return add

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


# The scoring strategies of `s2ft.selection`, which registers the built-in ones; `S2FTConfig` checks names against it.
STRATEGIES: Registry[Callable] = Registry("strategy")

"""A small name -> constructor registry with a helpful error for unknown names (timm's create_model pattern)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """Raised for a name that is not registered; the message lists the valid names."""


class Registry(Generic[T]):
    """Maps names to constructors.

    Example:
        LOSSES = Registry("loss")

        @LOSSES.register("ce")
        class CrossEntropy(nn.Module): ...

        loss = LOSSES.create("ce", class_counts=counts)
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def create(self, name: str, /, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

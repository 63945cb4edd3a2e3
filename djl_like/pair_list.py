"""An ordered list of (key, value) pairs that allows repeated keys: the content of LMI's ``Input``
and ``Output`` (DJL's ``PairList``), with the methods handlers written for LMI call."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class PairList:
    """Keys are strings or None; ``get(key)`` returns the first value under ``key``."""

    def __init__(self, pairs: list[tuple[str | None, Any]] | None = None):
        self._pairs: list[tuple[str | None, Any]] = list(pairs or [])

    def add(self, key: str | None = None, value: Any = None) -> None:
        self._pairs.append((key, value))

    def get(self, key: str) -> Any:
        return next((value for name, value in self._pairs if name == key), None)

    def get_keys(self) -> list[str | None]:
        return [name for name, _ in self._pairs]

    def get_values(self) -> list[Any]:
        return [value for _, value in self._pairs]

    def key_at(self, index: int) -> str | None:
        return self._pairs[index][0]

    def value_at(self, index: int) -> Any:
        return self._pairs[index][1]

    def size(self) -> int:
        return len(self._pairs)

    def is_empty(self) -> bool:
        return not self._pairs

    def __iter__(self) -> Iterator[tuple[str | None, Any]]:
        return iter(self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

"""The explicit registry of batching strategies, keyed by the strategy name of the config."""

from __future__ import annotations

from batching.dynamic import DynamicBatcher
from batching.paged import PagedBatcher
from batching.rolling import RollingBatcher
from batching.scheduler import Batcher

BATCHERS: dict[str, type[Batcher]] = {
    "dynamic": DynamicBatcher,
    "rolling": RollingBatcher,
    "paged": PagedBatcher,
}


def batcher_class(name: str) -> type[Batcher]:
    try:
        return BATCHERS[name]
    except KeyError:
        raise ValueError(f"unknown batching strategy {name!r}; supported: {', '.join(BATCHERS)}") from None


def is_contiguous(name: str) -> bool:
    """Contiguous strategies reserve one slot of max_model_len tokens per sequence."""
    return name in ("dynamic", "rolling")

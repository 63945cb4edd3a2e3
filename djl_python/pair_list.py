"""Alias of ``djl_like.pair_list`` under DJL's module name."""

from djl_like.pair_list import PairList

__all__ = ["PairList"]

"""Alias of ``djl_like.inputs`` under DJL's module name (``from djl_python.inputs import Input``)."""

from djl_like.inputs import Input

__all__ = ["Input"]

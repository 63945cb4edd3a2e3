"""Alias of ``djl_like.outputs`` under DJL's module name (``from djl_python.outputs import Output``)."""

from djl_like.outputs import Output

__all__ = ["Output"]

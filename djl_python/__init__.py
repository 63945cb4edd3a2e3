"""An import alias for handlers written for AWS LMI (DJL Serving): ``from djl_python import Input,
Output`` runs them unchanged here. The classes live in ``djl_like``; nothing else of DJL's
``djl_python`` package is provided."""

from djl_like.inputs import Input
from djl_like.outputs import Output

__all__ = ["Input", "Output"]

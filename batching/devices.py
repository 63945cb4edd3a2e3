"""Which devices a model copy computes on. Importable without torch (``serve``'s master uses it).

``serve`` runs one gunicorn worker per model copy; the master gives each worker a slot (0, 1,
...; a replaced worker takes its predecessor's) in ``$LMI_COPY_SLOT``. On CUDA, copy ``s`` with
tensor-parallel degree ``n`` computes on GPUs ``s*n .. s*n + n - 1``, so copies never share a
device; on CPU every copy shares the host.
"""

from __future__ import annotations

import os

COPY_SLOT_VARIABLE = "LMI_COPY_SLOT"


def copy_devices(requested: str | None, degree: int, env=os.environ) -> tuple[str | None, int]:
    """(the device of this copy's rank 0, the index of its first GPU) for ``option.device`` and
    the tensor-parallel degree. Raises ``ConfigError`` when the copies need more GPUs than exist."""
    import torch

    from djl_like.errors import ConfigError

    if requested == "cpu" or not torch.cuda.is_available():
        return requested, 0
    slot = int(env.get(COPY_SLOT_VARIABLE, "0"))
    first = slot * degree
    available = torch.cuda.device_count()
    if first + degree > available:
        raise ConfigError(f"model copy {slot} needs GPUs {first}..{first + degree - 1} (maxWorkers x "
                          f"option.tensor_parallel_degree={degree}), but {available} GPU(s) are visible")
    return f"cuda:{first}", first

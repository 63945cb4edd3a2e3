"""The project's native CPU kernels (kernels/csrc), compiled at run time with the machine's C++
compiler through ``torch.utils.cpp_extension`` and cached by torch (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``): the first start on a machine compiles for about 20-40 s,
later starts load the cached build.

``LMI_CPU_KERNELS=torch`` keeps the torch implementations (kernels/reference.py); so does a
machine without a compiler, with a warning. The model runner's load-time check then verifies
whichever serves.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("cpu_attention.cpp", "cpu_layer_ops.cpp", "cpu_linear.cpp")]
HEADERS = [CSRC / "cpu_common.h"]
ENV = "LMI_CPU_KERNELS"

_lock = threading.Lock()
_module = None
_failure: str | None = None


def _cpu_tag() -> str:
    from batching.runner import read_cpu_flags

    return hashlib.sha256(" ".join(sorted(read_cpu_flags())).encode()).hexdigest()[:12]


def _headers_tag() -> str:
    return hashlib.sha256(b"".join(path.read_bytes() for path in HEADERS)).hexdigest()[:8]


def load():
    """The compiled module, or None when the torch path serves (``LMI_CPU_KERNELS=torch``, or the
    build failed: the reason is logged once)."""
    global _module, _failure
    choice = os.environ.get(ENV, "native").strip().lower()
    if choice not in ("native", "torch"):
        from djl_like.errors import ConfigError

        raise ConfigError(f"{ENV}={choice!r}: choose native or torch")
    if choice == "torch":
        return None
    with _lock:
        if _module is None and _failure is None:
            started = time.perf_counter()
            try:
                from torch.utils.cpp_extension import load as build

                # NOTE: built for this CPU (-march=native), so the name carries its features: a
                # cache shared with a CPU that lacks some (AVX-512 vs AVX2 only) builds its own.
                # It carries the headers' contents too: torch rebuilds on changes of the sources only.
                _module = build(f"lmi_cpu_kernels_{_cpu_tag()}_{_headers_tag()}", [str(path) for path in SOURCES],
                                extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-fno-strict-aliasing"], verbose=False)
                logger.info("native CPU kernels ready (%.1f s)", time.perf_counter() - started)
            except Exception as error:  # NOTE: no compiler, headers or toolchain: the torch path serves
                _failure = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
                logger.warning("native CPU kernels could not be built (%s); the torch implementations serve "
                               "(set %s=torch to skip the build)", _failure, ENV)
    return _module

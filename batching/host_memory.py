"""Host memory for CPU serving: freed memory kept in the process instead of returned to the kernel
(glibc only), and weights placed in huge pages (:class:`HugePageArena`).

A CPU step allocates and frees the same large temporaries every step (gathered K/V, scores,
activations, sampler rows). glibc's malloc serves blocks above its mmap threshold (128 KiB,
raised only after such a block is freed) with fresh ``mmap`` pages and trims the heap on free,
so the next step pays the page faults again: measured on the machine of docs/benchmarks.md, the
decode attention of 32 sequences of 50 to 2000 tokens took 30.6 ms per layer, of which about
two thirds were page faults; with the settings below, 10.0 ms. (vLLM's CPU guide preloads
tcmalloc for the same reason; this needs no extra library.)

Settings: blocks up to 32 MiB (glibc's ceiling for the threshold) come from the heap, and up to
1 GiB of free heap top is kept. The process's resident memory therefore stays near its peak,
as it would with tcmalloc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import platform

import torch

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20

_done = False


def keep_freed_memory() -> bool:
    """Apply the settings once per process; False where the C library is not glibc."""
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        applied = all(libc.mallopt(option, value) == 1 for option, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    except (OSError, AttributeError):
        return False
    if applied:
        _done = True
        logger.info("malloc: blocks up to %d MiB from the heap, freed memory kept (no page faults per step)",
                    MMAP_THRESHOLD >> 20)
    return applied


class HugePageArena:
    """Tensors carved out of anonymous mappings advised for transparent huge pages (Linux).

    A decode step streams every weight once: with 4 KiB pages that is a TLB miss, and a page walk,
    every 4 KiB of a few hundred MB. Weights in 2 MiB pages streamed 5-12 % faster through the
    bf16 linear kernel at 1 to 32 rows (docs/benchmarks.md). ``empty`` hands out consecutive, 64-byte aligned
    pieces of mappings of ``block_bytes`` (a larger one for a larger tensor); a mapping lives as
    long as any tensor cut from it, and only the pages written are backed by memory. Where the
    kernel does not support it (not Linux, THP set to ``never``), the pages are ordinary ones.
    """

    ALIGN = 64
    HUGE_PAGE = 2 << 20

    def __init__(self, block_bytes: int = 64 << 20):
        self.block_bytes = block_bytes
        self._block: torch.Tensor | None = None
        self._used = 0

    @staticmethod
    def supported() -> bool:
        return platform.system() == "Linux" and hasattr(mmap, "MADV_HUGEPAGE")

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized 1-D tensor of ``numel`` elements (plain ``torch.empty`` where
        huge pages cannot be asked for)."""
        if not self.supported():
            return torch.empty(numel, dtype=dtype)
        nbytes = numel * dtype.itemsize
        if self._block is None or self._used + nbytes > self._block.numel():
            size = max(self.block_bytes, -(-nbytes // self.HUGE_PAGE) * self.HUGE_PAGE)
            mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            try:
                mapping.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # NOTE: a kernel without THP: ordinary pages, same layout
                pass
            self._block, self._used = torch.frombuffer(mapping, dtype=torch.uint8), 0
        piece = self._block[self._used:self._used + nbytes].view(dtype)
        self._used += -(-nbytes // self.ALIGN) * self.ALIGN
        return piece

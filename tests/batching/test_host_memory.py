"""batching/host_memory.py: after ``keep_freed_memory``, the large temporaries a step allocates
and frees stop costing page faults step after step (measured in fresh processes, since the
setting is process-wide)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

# The decode attention of 32 sequences of 50 to 2000 tokens (its gathered K/V, scores and
# probabilities are the temporaries a long-context step allocates and frees in every layer).
PROBE = """
import resource, sys, torch
torch.set_num_threads(1)
from batching import host_memory
from kernels import reference
if sys.argv[1] == "on":
    assert host_memory.keep_freed_memory()
g = torch.Generator().manual_seed(0)
lengths = torch.randint(50, 2000, (32,), generator=g)
width = int(lengths.max())
k_cache = torch.randn(32 * width // 16 + 1, 16, 3, 64, dtype=torch.bfloat16)
v_cache = torch.randn_like(k_cache)
tables = torch.arange(32 * (width // 16 + 1)).view(32, -1)[:, : width // 16 + 1] % k_cache.shape[0]
query = torch.randn(32, 9, 64, dtype=torch.bfloat16)
def step():
    reference.paged_decode_attention(query, k_cache, v_cache, tables, lengths, 0.125)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_freed_blocks_are_reused_without_page_faults():
    default, kept = _faults("off"), _faults("on")
    # measured when written: 114045 page faults over 10 steps by default, 5932 with the setting;
    # one later run of the whole suite saw 28205 by default (the default's count varies with the
    # host's memory management; the setting's does not), hence a margin of 3x rather than 5x
    assert kept * 3 < default


def _thp_mode() -> str | None:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


def _mapping_flags(address: int) -> dict[str, str]:
    """/proc/self/smaps fields of the mapping that holds ``address``."""
    fields: dict[str, str] = {}
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def test_the_arena_hands_out_aligned_separate_tensors_that_outlive_it():
    import gc

    import torch

    from batching.host_memory import HugePageArena

    arena = HugePageArena(block_bytes=4 << 20)
    pieces = [arena.empty(n, dtype) for n, dtype in
              ((1000, torch.bfloat16), (3, torch.float32), (3 << 20, torch.bfloat16), (77, torch.uint8))]
    assert [p.numel() for p in pieces] == [1000, 3, 3 << 20, 77]
    assert [p.dtype for p in pieces] == [torch.bfloat16, torch.float32, torch.bfloat16, torch.uint8]
    assert all(p.data_ptr() % 64 == 0 for p in pieces)
    for value, piece in enumerate(pieces):
        piece.fill_(value)
    del arena
    gc.collect()
    # each keeps its value: no piece overlaps another, and the mappings live on with the pieces
    assert all(bool((piece == value).all()) for value, piece in enumerate(pieces))


@pytest.mark.skipif(_thp_mode() in (None, "never"), reason="transparent huge pages are off on this host")
def test_the_arenas_memory_is_advised_for_huge_pages():
    import torch

    from batching.host_memory import HugePageArena

    piece = HugePageArena().empty(8 << 20, torch.bfloat16)
    piece.fill_(1)
    flags = _mapping_flags(piece.data_ptr())
    assert flags.get("THPeligible") == "1", flags

"""Triton kernels (K/V slot write, paged decode attention) against ``kernels/reference.py``.

Where the kernels run:
- CUDA available: natively, in this process, fp32/fp16/bf16.
- No CUDA: Triton kernels run only under its interpreter, which ``@triton.jit`` selects when it
  *decorates* a kernel, i.e. when ``kernels.triton_*`` is imported (checked with triton 3.9; the
  flag is not re-read at launch). Another test module may import those modules first, so this
  process never relies on import order: ``test_kernels_under_triton_interpreter`` reruns this
  file in a child pytest with ``TRITON_INTERPRET=1`` (fp32/fp16, tiny shapes), and here the
  kernel tests are skipped. Running this file with ``TRITON_INTERPRET=1`` set runs them in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton.runtime import JITFunction

from kernels import reference
from kernels.triton_decode import _decode_split_kernel, choose_num_splits, launch_config, paged_decode_attention
from kernels.triton_write_kv import write_kv

REPO_ROOT = Path(__file__).resolve().parents[2]
_CHILD_MARKER = "LMI_TRITON_KERNEL_TESTS_CHILD"
KERNELS_INTERPRETED = not isinstance(_decode_split_kernel, JITFunction)
if KERNELS_INTERPRETED:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None  # compiled kernels and no GPU: the child process runs them

needs_kernels = pytest.mark.skipif(
    DEVICE is None, reason="no CUDA: run by test_kernels_under_triton_interpreter in a TRITON_INTERPRET=1 child")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # atol = rtol
HEAD_DIM = 16  # tiny: the interpreter costs seconds per launch at real sizes


# ---------------------------------------------------------------- helpers


def _random_paged_cache(context_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype, generator: torch.Generator):
    """Caches [num_blocks, block_size, Hkv, D] holding the sequences' blocks in shuffled physical
    order, and block_tables [B, max_blocks] as a non-contiguous view (stride(0) != max_blocks)."""
    blocks_per_seq = [-(-length // block_size) for length in context_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks hold noise the kernel must never read
    physical = torch.randperm(num_blocks, generator=generator)
    max_blocks = max(blocks_per_seq) + 1  # one padding column, as a runner pads its table
    wide = torch.zeros(len(context_lens), max_blocks + 2, dtype=torch.int32)
    start = 0
    for seq, count in enumerate(blocks_per_seq):
        wide[seq, :count] = physical[start:start + count].int()
        start += count
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=generator).to(dtype)
    v_cache = torch.randn(shape, generator=generator).to(dtype)
    return k_cache.to(DEVICE), v_cache.to(DEVICE), wide[:, :max_blocks].to(DEVICE)


def _random_query(batch_size: int, num_heads: int, head_dim: int, dtype: torch.dtype, generator) -> torch.Tensor:
    """query [B, Hq, D] as a slice of a packed qkv projection: rows not contiguous."""
    qkv = torch.randn(batch_size, num_heads + 4, head_dim, generator=generator).to(dtype).to(DEVICE)
    return qkv[:, :num_heads]


def _assert_decode_matches_reference(query, k_cache, v_cache, block_tables, context_lens, **kwargs):
    scale = query.shape[-1] ** -0.5
    out = paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale, **kwargs)
    # The reference runs in fp32 on the same (rounded) inputs: the tolerance then bounds our error.
    layer = {name: kwargs[name] for name in ("sliding_window", "softcap", "sinks") if name in kwargs}
    expected = reference.paged_decode_attention(query.float(), k_cache.float(), v_cache.float(),
                                                block_tables, context_lens, scale, **layer)
    tol = TOLERANCE[query.dtype]
    assert out.dtype == query.dtype and out.shape == query.shape
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


# ---------------------------------------------------------------- paged decode attention

HEAD_LAYOUTS = [(6, 2), (4, 1), (2, 2), (17, 1)]  # (Hq, Hkv): GQA, MQA, MHA, odd group of 17
# 40 == the longest context: one block per sequence, the contiguous strategies' layout.
BLOCK_SIZES = [1, 4, 5, 16, 40]
CONTEXT_LENS = [40, 1, 17, 33]  # not multiples of the block sizes; 1 leaves later splits empty


@needs_kernels
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEAD_LAYOUTS)
def test_decode_matches_reference_fp32(num_heads, num_kv_heads, block_size, num_splits):
    generator = torch.Generator().manual_seed(block_size * 100 + num_heads)
    caches = _random_paged_cache(CONTEXT_LENS, block_size, num_kv_heads, HEAD_DIM, torch.float32, generator)
    query = _random_query(len(CONTEXT_LENS), num_heads, HEAD_DIM, torch.float32, generator)
    context_lens = torch.tensor(CONTEXT_LENS, device=DEVICE)
    # tile_size 16 (the minimum): 40 tokens span 3 tiles, so the loop and the splits both run.
    _assert_decode_matches_reference(query, *caches, context_lens, num_splits=num_splits, tile_size=16)


@needs_kernels
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEAD_LAYOUTS)
def test_decode_matches_reference_half(num_heads, num_kv_heads, block_size, num_splits, dtype):
    generator = torch.Generator().manual_seed(block_size * 100 + num_heads)
    caches = _random_paged_cache(CONTEXT_LENS, block_size, num_kv_heads, HEAD_DIM, dtype, generator)
    query = _random_query(len(CONTEXT_LENS), num_heads, HEAD_DIM, dtype, generator)
    context_lens = torch.tensor(CONTEXT_LENS, device=DEVICE)
    _assert_decode_matches_reference(query, *caches, context_lens, num_splits=num_splits, tile_size=16)


@needs_kernels
@pytest.mark.parametrize("head_dim", [24, 64])  # not a power of two (masked); a real size
def test_decode_default_splits_and_tile(head_dim):
    generator = torch.Generator().manual_seed(head_dim)
    lens = [38, 9]
    caches = _random_paged_cache(lens, 4, 2, head_dim, torch.float32, generator)
    query = _random_query(len(lens), 4, head_dim, torch.float32, generator)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    _assert_decode_matches_reference(query, *caches, context_lens)


@needs_kernels
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_zero_length_sequence_is_zero_and_harmless(num_splits):
    """A padding row (context_len 0, as CUDA-graph padding uses) outputs zeros, never NaN, and
    leaves the other sequences exact."""
    generator = torch.Generator().manual_seed(7)
    lens = [21, 0, 40]
    k_cache, v_cache, block_tables = _random_paged_cache(lens, 4, 2, HEAD_DIM, torch.float32, generator)
    query = _random_query(len(lens), 4, HEAD_DIM, torch.float32, generator)
    context_lens = torch.tensor(lens, device=DEVICE)
    out = paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, 0.25,
                                 num_splits=num_splits, tile_size=16)
    expected = reference.paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, 0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[[0, 2]], expected[[0, 2]], atol=1e-5, rtol=1e-5)


# Layer parameters transformers hands the attention function: sliding windows shorter and longer
# than the contexts (and not multiples of the tile), Gemma-2-style softcapping small enough to
# bend the scores, gpt-oss-style sinks, and all three together.
LAYER_CASES = [
    dict(sliding_window=7),
    dict(sliding_window=20),
    dict(sliding_window=1),
    dict(softcap=0.5),
    dict(sinks=True),
    dict(sliding_window=11, softcap=2.0, sinks=True),
]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("layer", LAYER_CASES, ids=lambda case: "-".join(case))
@pytest.mark.parametrize("num_heads,num_kv_heads", [(6, 2), (17, 1)])
def test_decode_layer_parameters_match_reference(num_heads, num_kv_heads, layer, num_splits, dtype):
    generator = torch.Generator().manual_seed(num_heads + len(layer))
    lens = [40, 1, 17, 33, 0]
    caches = _random_paged_cache([max(1, n) for n in lens], 5, num_kv_heads, HEAD_DIM, dtype, generator)
    query = _random_query(len(lens), num_heads, HEAD_DIM, dtype, generator)
    layer = dict(layer)
    if layer.get("sinks"):
        layer["sinks"] = (torch.randn(num_heads, generator=generator) * 2).to(DEVICE)
    context_lens = torch.tensor(lens, device=DEVICE)
    scale = HEAD_DIM ** -0.5
    out = paged_decode_attention(query, *caches, context_lens, scale, num_splits=num_splits, tile_size=16, **layer)
    expected = reference.paged_decode_attention(query.float(), caches[0].float(), caches[1].float(), caches[2],
                                                context_lens, scale, **layer)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out[:4].float(), expected[:4], atol=tol, rtol=tol)
    # A padding row (context 0) is zeros, never NaN, whatever the layer asks for.
    assert torch.equal(out[4], torch.zeros_like(out[4]))


# ---------------------------------------------------------------- K/V slot write

WRITE_DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.float16)]
if DEVICE == "cuda":
    WRITE_DTYPES += [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]


@needs_kernels
@pytest.mark.parametrize("key_dtype,cache_dtype", WRITE_DTYPES)
@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 16), (3, 24)])
def test_write_kv_matches_reference(key_dtype, cache_dtype, block_size, num_kv_heads, head_dim):
    generator = torch.Generator().manual_seed(block_size)
    num_tokens = 9
    num_blocks = 2 * num_tokens // block_size + 1  # spare slots stay untouched
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=generator).to(cache_dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=generator).to(cache_dtype).to(DEVICE)
    # key/value as slices of a packed qkv projection: token and head strides not contiguous.
    qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=generator).to(key_dtype).to(DEVICE)
    key, value = qkv[:, num_kv_heads:2 * num_kv_heads], qkv[:, 2 * num_kv_heads:]
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    slots[[1, 4]] = -1  # padding tokens: their slots must stay untouched
    slot_mapping = slots.to(DEVICE)

    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.write_kv(key, value, expected_k, expected_v, slot_mapping)
    write_kv(key, value, k_cache, v_cache, slot_mapping)
    torch.testing.assert_close(k_cache, expected_k, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, expected_v, atol=0, rtol=0)


@needs_kernels
def test_write_then_decode_reads_new_token():
    """The engine's order: write the new token's K/V through slot_mapping, then attend to it."""
    generator = torch.Generator().manual_seed(3)
    lens = [12, 5]
    k_cache, v_cache, block_tables = _random_paged_cache(lens, 4, 2, HEAD_DIM, torch.float32, generator)
    positions = torch.tensor(lens) - 1
    slot_mapping = reference.context_slots(block_tables.cpu(), positions[:, None], 4)[:, 0].to(DEVICE)
    key = torch.randn(2, 2, HEAD_DIM, generator=generator).to(DEVICE)
    value = torch.randn(2, 2, HEAD_DIM, generator=generator).to(DEVICE)
    write_kv(key, value, k_cache, v_cache, slot_mapping)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.write_kv(key, value, expected_k, expected_v, slot_mapping)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    query = _random_query(2, 4, HEAD_DIM, torch.float32, generator)
    _assert_decode_matches_reference(query, k_cache, v_cache, block_tables, torch.tensor(lens, device=DEVICE),
                                     tile_size=16)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU with ~9 GB free")
def test_offsets_beyond_int32_on_cuda():
    """Caches over 2^31 elements: block * stride must not wrap around in int32."""
    block_size, head_dim = 16, 128
    num_blocks = 2**31 // (block_size * head_dim) + 2
    if torch.cuda.mem_get_info()[0] < 10 * 2**30:
        pytest.skip("needs ~9 GB of free GPU memory")
    k_cache = torch.zeros(num_blocks, block_size, 1, head_dim, dtype=torch.float16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    last_block = num_blocks - 1
    slot_mapping = torch.arange(block_size, device="cuda") + last_block * block_size
    key = torch.randn(block_size, 1, head_dim, dtype=torch.float16, device="cuda")
    value = torch.randn_like(key)
    write_kv(key, value, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache[last_block, :, 0], key[:, 0]) and torch.equal(v_cache[last_block, :, 0], value[:, 0])

    query = torch.randn(1, 4, head_dim, dtype=torch.float16, device="cuda")
    context_lens = torch.tensor([block_size], device="cuda")
    block_tables = torch.tensor([[last_block]], dtype=torch.int32, device="cuda")
    out = paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, 0.1)
    # The reference reads the same block from a one-block cache: no 17 GB fp32 copy.
    expected = reference.paged_decode_attention(query.float(), k_cache[last_block:].float(),
                                                v_cache[last_block:].float(), torch.zeros_like(block_tables),
                                                context_lens, 0.1)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------- split heuristic


def test_choose_num_splits():
    # A large decode batch fills the GPU alone: no split, no merge kernel.
    assert choose_num_splits(num_programs=64 * 8, max_context_len=2048, tile_size=32, target_programs=264) == 1
    # A small batch over a long context splits to fill the GPU ...
    assert choose_num_splits(num_programs=8, max_context_len=8192, tile_size=32, target_programs=264) == 33
    # ... but each split keeps >= 4 tiles, and there is always at least one.
    assert choose_num_splits(num_programs=8, max_context_len=512, tile_size=32, target_programs=264) == 4
    assert choose_num_splits(num_programs=1, max_context_len=20, tile_size=32, target_programs=264) == 1


def test_launch_config_never_more_splits_than_tiles():
    cpu = torch.device("cpu")
    assert launch_config(1, 1, 16, max_context_len=20, device=cpu, num_splits=100, tile_size=16) == (2, 16)
    assert launch_config(1, 1, 128, max_context_len=4096, device=cpu) == (1, 32)  # CPU: no split by default


# ---------------------------------------------------------------- launcher validation


def _decode_args(device: str):
    query = torch.randn(2, 4, 16, device=device)
    k_cache = torch.randn(5, 4, 2, 16, device=device)
    block_tables = torch.zeros(2, 3, dtype=torch.int32, device=device)
    context_lens = torch.tensor([3, 9], device=device)
    return dict(query=query, k_cache=k_cache, v_cache=k_cache.clone(), block_tables=block_tables,
                context_lens=context_lens, scale=0.25)


DECODE_ERRORS = [
    (lambda a: {"query": a["query"][0]}, "query must be [B, Hq, D]"),
    (lambda a: {"query": a["query"][:, :3]}, "multiple of the cache's KV heads"),
    (lambda a: {"query": a["query"][..., :8]}, "head_dim 8 does not match"),
    (lambda a: {"query": a["query"].double()}, "query dtype float64"),
    (lambda a: {"query": torch.randn(2, 4, 32, device=a["query"].device)[..., ::2]}, "contiguous in its last dim"),
    (lambda a: {"v_cache": a["v_cache"][:4]}, "k_cache and v_cache"),
    (lambda a: {"k_cache": a["k_cache"].half()}, "must share a dtype"),
    (lambda a: {"block_tables": a["block_tables"].float()}, "block_tables dtype float32"),
    (lambda a: {"block_tables": a["block_tables"][:1]}, "block_tables must be [B, max_blocks]"),
    (lambda a: {"context_lens": a["context_lens"][:1]}, "context_lens must be [B]"),
    (lambda a: {"num_splits": 0}, "num_splits"),
    (lambda a: {"tile_size": 24}, "tile_size"),
    (lambda a: {"context_lens": a["context_lens"].to("meta")}, "one device"),
    (lambda a: {"sliding_window": 0}, "sliding_window must be a positive int"),
    (lambda a: {"softcap": -1.0}, "softcap must be a positive finite number"),
    (lambda a: {"sinks": torch.zeros(3, device=a["query"].device)}, "sinks must be [Hq] = [4]"),
]


@pytest.mark.parametrize("make_bad,message", DECODE_ERRORS)
def test_decode_rejects_bad_arguments(make_bad, message):
    args = _decode_args(DEVICE or "cpu")
    args.update(make_bad(args))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        paged_decode_attention(**args)


def _write_args(device: str):
    key = torch.randn(3, 2, 16, device=device)
    k_cache = torch.zeros(4, 4, 2, 16, device=device)
    return dict(key=key, value=key.clone(), k_cache=k_cache, v_cache=k_cache.clone(),
                slot_mapping=torch.tensor([0, -1, 5], device=device))


WRITE_ERRORS = [
    (lambda a: {"key": a["key"][0]}, "key and value must both be [T, Hkv, D]"),
    (lambda a: {"value": a["value"][:2]}, "key and value must both be [T, Hkv, D]"),
    (lambda a: {"key": a["key"][..., :8], "value": a["value"][..., :8]}, "do not match the cache"),
    (lambda a: {"slot_mapping": a["slot_mapping"][:2]}, "slot_mapping must be [T]"),
    (lambda a: {"slot_mapping": a["slot_mapping"].float()}, "slot_mapping dtype float32"),
    (lambda a: {"value": a["value"].int()}, "value dtype int32"),
    (lambda a: {"k_cache": a["k_cache"][..., 0]}, "k_cache and v_cache"),
    (lambda a: {"key": torch.randn(3, 2, 32, device=a["key"].device)[..., ::2]}, "contiguous in its last dim"),
    (lambda a: {"slot_mapping": a["slot_mapping"].to("meta")}, "one device"),
]


@pytest.mark.parametrize("make_bad,message", WRITE_ERRORS)
def test_write_kv_rejects_bad_arguments(make_bad, message):
    args = _write_args(DEVICE or "cpu")
    args.update(make_bad(args))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        write_kv(**args)


@pytest.mark.skipif(DEVICE is not None, reason="kernels can run here")
def test_compiled_kernels_reject_cpu_tensors():
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        paged_decode_attention(**_decode_args("cpu"))
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        write_kv(**_write_args("cpu"))


# ---------------------------------------------------------------- CPU: rerun under the interpreter


@pytest.mark.skipif(DEVICE is not None, reason="kernel tests run in this process")
def test_kernels_under_triton_interpreter():
    if os.environ.get(_CHILD_MARKER):
        pytest.fail("TRITON_INTERPRET=1 was set but the kernels were compiled, not interpreted")
    env = {**os.environ, "TRITON_INTERPRET": "1", _CHILD_MARKER: "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout, report

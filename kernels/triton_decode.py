"""Paged decode attention (one query token per sequence) in Triton: split-K / flash-decoding.

Same contract as ``kernels.reference.paged_decode_attention``. Two kernels:

1. ``_decode_split_kernel``, grid ``(B, Hkv, num_splits)``: a program takes the ``G = Hq // Hkv``
   query heads that share one KV head (so each K/V tile is loaded once per group, never expanded
   per query head), walks its contiguous share of the sequence's context in tiles of ``TILE``
   tokens, finds each token's slot through the block table (so any block size works, tiles and
   blocks are independent), and keeps an online softmax in fp32. It writes ``acc / l`` and the
   log-sum-exp per split, or, with one split, the final output directly.
2. ``_merge_splits_kernel``, grid ``(B, Hq)``: combines the splits exactly by their log-sum-exp.

Softmax runs in base 2 (``exp2`` is the fast instruction): scores are multiplied by ``log2(e)``
after scaling (and softcapping) and the stored log-sum-exp is in log2 units; both kernels agree.

The layer parameters of ``kernels.reference.AttentionParams`` are honoured: a sliding window
(the program starts at the first tile of the window, and masks the keys before it), logit
softcapping (``softcap * tanh(score / softcap)`` on the scaled scores) and attention sinks (one
extra logit per query head in the softmax's denominator, added once: by the split kernel when
there is one split, by the merge kernel otherwise).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels.triton_write_kv import (FLOAT_DTYPES, INDEX_DTYPES, check_dtype, check_kv_cache_pair,
                                     check_last_dim_contiguous, check_same_device)

# NOTE: tl.dot needs M, N, K >= 16 on GPUs: the query-head group is padded to 16 rows, and tiles
# and head_dim are at least 16.
_MIN_DOT = 16
# NOTE: split only while B * Hkv programs leave SMs idle; ~2 programs per SM hide memory latency
# for this memory-bound kernel. Each split keeps >= 4 tiles so its fixed cost (query load,
# partial store, merge) stays small next to its K/V traffic.
_PROGRAMS_PER_SM = 2
_MIN_TILES_PER_SPLIT = 4
# NOTE: a [TILE, D] K tile and V tile in fp32 registers; 4K elements each keeps 4 warps spill-free.
_TILE_ELEMENTS = 4096
_MAX_TILE = 64


LOG2E: tl.constexpr = 1.4426950408889634


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^2x + 1): exact limits +-1 when e^2x overflows to inf or underflows to 0.
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def _decode_split_kernel(
    query_ptr,  # [B, Hq, D]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    block_tables_ptr,  # [B, max_blocks]
    context_lens_ptr,  # [B]
    out_ptr,  # [B, Hq, num_splits, D] fp32 partials, or the final [B, Hq, D] when num_splits == 1
    lse_ptr,  # [B, Hq, num_splits] fp32, log2 units; untouched unless STORE_LSE
    sinks_ptr,  # [Hq] sink logits; read only when HAS_SINKS
    scale,  # softmax scale
    sliding_window,  # keys within this many positions of the query (itself included); 0: no window
    softcap,  # logit softcap; read only when USE_SOFTCAP
    group_size, head_dim, block_size,
    stride_q_batch, stride_q_head,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    stride_bt_batch, stride_bt_block,
    stride_o_batch, stride_o_head, stride_o_split,
    stride_lse_batch, stride_lse_head,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 caches; "tf32" is exact for fp16/bf16 inputs
    STORE_LSE: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    rows = tl.arange(0, GROUP_PAD)  # query heads of this KV head's group, padded
    dims = tl.arange(0, HEAD_DIM_PAD)
    row_mask = rows < group_size
    dim_mask = dims < head_dim
    heads = (kv_head * group_size + rows).to(tl.int64)

    # q: [GROUP_PAD, HEAD_DIM_PAD]; padded rows are zero and give finite, discarded scores.
    q_ptrs = query_ptr + seq * stride_q_batch + heads[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)

    # This split's contiguous share of the tiles holding the sequence's context (or its window);
    # trailing splits of short sequences get none and store an empty result (l = 0, lse = -inf)
    # that the merge weighs as 0.
    context_len = tl.load(context_lens_ptr + seq)
    context_start = tl.where(sliding_window > 0, tl.maximum(context_len - sliding_window, 0), 0)
    first_tile = context_start // TILE
    num_tiles = tl.cdiv(context_len, TILE) - first_tile
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_start = first_tile + split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, first_tile + num_tiles)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max score, log2 units
    l = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)  # running sum of exp2(score - m) * v
    kv_head_offset = kv_head.to(tl.int64)
    for tile in range(tile_start, tile_end):
        positions = tile * TILE + tl.arange(0, TILE)  # [TILE] token positions in the sequence
        valid = (positions < context_len) & (positions >= context_start)
        blocks = tl.load(block_tables_ptr + seq * stride_bt_batch + (positions // block_size) * stride_bt_block,
                         mask=valid, other=0).to(tl.int64)
        in_block = (positions % block_size).to(tl.int64)
        kv_mask = valid[:, None] & dim_mask[None, :]
        k_ptrs = (k_cache_ptr + blocks[:, None] * stride_k_block + in_block[:, None] * stride_k_slot
                  + kv_head_offset * stride_k_head + dims[None, :])
        v_ptrs = (v_cache_ptr + blocks[:, None] * stride_v_block + in_block[:, None] * stride_v_slot
                  + kv_head_offset * stride_v_head + dims[None, :])
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(tl.float32)  # [TILE, HEAD_DIM_PAD]
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(tl.float32)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [GROUP_PAD, TILE]
        if USE_SOFTCAP:
            scores = softcap * _tanh(scores / softcap)
        scores = scores * LOG2E
        # Every tile in range holds >= 1 valid position, so m_new is finite after the first tile.
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m = m_new

    if HAS_SINKS and not STORE_LSE:  # one split: the sink joins this program's softmax
        sink = tl.load(sinks_ptr + heads, mask=row_mask, other=0.0).to(tl.float32) * LOG2E
        m_final = tl.maximum(m, sink)
        alpha = tl.exp2(m - m_final)
        l = l * alpha + tl.exp2(sink - m_final)
        acc = acc * alpha[:, None]

    empty = l == 0.0
    out = acc / tl.where(empty, 1.0, l)[:, None]  # empty split (or context_len 0) -> zeros, not NaN
    o_ptrs = out_ptr + seq * stride_o_batch + heads[:, None] * stride_o_head + split * stride_o_split + dims[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])
    if STORE_LSE:
        lse = tl.where(empty, float("-inf"), m + tl.log2(tl.where(empty, 1.0, l)))
        tl.store(lse_ptr + seq * stride_lse_batch + heads * stride_lse_head + split, lse, mask=row_mask)


@triton.jit
def _merge_splits_kernel(
    partial_ptr,  # [B, Hq, num_splits, D] fp32, contiguous
    lse_ptr,  # [B, Hq, num_splits] fp32, contiguous, log2 units
    out_ptr,  # [B, Hq, D]
    sinks_ptr,  # [Hq] sink logits; read only when HAS_SINKS
    num_splits, head_dim,
    stride_o_batch, stride_o_head,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    num_heads = tl.num_programs(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    split_mask = splits < num_splits
    dim_mask = dims < head_dim
    row = seq * num_heads + head  # (seq, head) row of the contiguous partial buffers

    lse = tl.load(lse_ptr + row * num_splits + splits, mask=split_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * LOG2E
        lse_max = tl.maximum(lse_max, sink)
    # All splits empty (context_len 0): weights are all 0 and the output is 0, not NaN.
    lse_ref = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_ref)  # [SPLITS_PAD]
    total = tl.sum(weights, axis=0)
    if HAS_SINKS:
        total += tl.exp2(sink - lse_ref)
    partial_ptrs = partial_ptr + (row * num_splits + splits[:, None]) * head_dim + dims[None, :]
    partial = tl.load(partial_ptrs, mask=split_mask[:, None] & dim_mask[None, :], other=0.0)
    out = tl.sum(partial * weights[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq * stride_o_batch + head * stride_o_head + dims,
             out.to(out_ptr.dtype.element_ty), mask=dim_mask)


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    *,
    tile_size: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over a paged cache: query [B, Hq, D] -> [B, Hq, D] (query's dtype).

    k_cache, v_cache: [num_blocks, block_size, Hkv, D] with Hq % Hkv == 0; block_tables:
    [B, max_blocks] int32/int64; context_lens: [B] int32/int64, each <= max_blocks * block_size
    (not checked: that would sync with the GPU). A sequence with context_len 0 gets zeros.
    sliding_window, softcap, sinks ([Hq]): as in ``kernels.reference.AttentionParams``.
    num_splits: splits of the context per (sequence, KV head); None picks one from the GPU size
    (``choose_num_splits``). tile_size: tokens per inner step (power of two >= 16); None picks one
    from head_dim. Raises ValueError on mismatched shapes, dtypes, strides or devices.
    """
    _check_decode_args(query, k_cache, v_cache, block_tables, context_lens, scale, num_splits, tile_size)
    _check_layer_args(query, sliding_window, softcap, sinks)
    batch_size, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty_like(query)
    if batch_size == 0:
        return out
    # The widest block table (or the window) bounds every context without reading context_lens
    # back from the GPU.
    max_context_len = block_tables.shape[1] * block_size
    if sliding_window is not None:
        max_context_len = min(max_context_len, sliding_window + _MAX_TILE)
    num_splits, tile = launch_config(batch_size, num_kv_heads, head_dim, max_context_len,
                                     query.device, num_splits, tile_size)
    group_size = num_heads // num_kv_heads
    if num_splits == 1:
        partial, lse = out, out  # the split kernel writes the final output; lse is not stored
        partial_strides = (out.stride(0), out.stride(1), 0)
    else:
        partial = torch.empty(batch_size, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        lse = torch.empty(batch_size, num_heads, num_splits, dtype=torch.float32, device=query.device)
        partial_strides = partial.stride()[:3]
    sinks_arg = sinks if sinks is not None else query  # a placeholder pointer, never read
    _decode_split_kernel[(batch_size, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, context_lens, partial, lse, sinks_arg,
        scale, sliding_window or 0, softcap or 1.0,
        group_size, head_dim, block_size,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), block_tables.stride(1),
        *partial_strides,
        lse.stride(0), lse.stride(1),
        GROUP_PAD=max(_MIN_DOT, triton.next_power_of_2(group_size)),
        HEAD_DIM_PAD=max(_MIN_DOT, triton.next_power_of_2(head_dim)),
        TILE=tile,
        DOT_PRECISION="ieee" if torch.float32 in (query.dtype, k_cache.dtype) else "tf32",
        STORE_LSE=num_splits > 1,
        USE_SOFTCAP=softcap is not None,
        HAS_SINKS=sinks is not None,
    )
    if num_splits > 1:
        _merge_splits_kernel[(batch_size, num_heads)](
            partial, lse, out, sinks_arg, num_splits, head_dim, out.stride(0), out.stride(1),
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
            HAS_SINKS=sinks is not None,
        )
    return out


def launch_config(batch_size: int, num_kv_heads: int, head_dim: int, max_context_len: int, device: torch.device,
                  num_splits: int | None = None, tile_size: int | None = None) -> tuple[int, int]:
    """(num_splits, tile_size) of a launch: the given values or the defaults, with num_splits capped
    at the number of tiles of ``max_context_len`` (never more splits than tiles)."""
    head_dim_pad = max(_MIN_DOT, triton.next_power_of_2(head_dim))
    tile = tile_size or max(_MIN_DOT, min(_MAX_TILE, _TILE_ELEMENTS // head_dim_pad))
    if num_splits is None:
        num_splits = choose_num_splits(batch_size * num_kv_heads, max_context_len, tile, _target_programs(device))
    return max(1, min(num_splits, triton.cdiv(max_context_len, tile))), tile


def choose_num_splits(num_programs: int, max_context_len: int, tile_size: int, target_programs: int) -> int:
    """Splits per (sequence, KV head): enough for ``num_programs * splits`` to reach
    ``target_programs``, but at most one per ``_MIN_TILES_PER_SPLIT`` tiles of the longest
    context, and at least 1 (1 whenever ``num_programs`` alone fills the GPU)."""
    if num_programs >= target_programs:
        return 1
    wanted = triton.cdiv(target_programs, max(1, num_programs))
    useful = triton.cdiv(max_context_len, tile_size) // _MIN_TILES_PER_SPLIT
    return max(1, min(wanted, useful))


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one by one: splitting only costs time
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _check_layer_args(query, sliding_window, softcap, sinks) -> None:
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None; got {sliding_window!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not softcap > 0 or not math.isfinite(softcap)):
        raise ValueError(f"softcap must be a positive finite number or None; got {softcap!r}")
    if sinks is not None:
        if sinks.shape != (query.shape[1],):
            raise ValueError(f"sinks must be [Hq] = [{query.shape[1]}]; got {tuple(sinks.shape)}")
        check_dtype("sinks", sinks, FLOAT_DTYPES)
        if not sinks.is_contiguous():
            raise ValueError("sinks must be contiguous")
        check_same_device(_decode_split_kernel, query=query, sinks=sinks)


def _check_decode_args(query, k_cache, v_cache, block_tables, context_lens, scale, num_splits, tile_size) -> None:
    check_kv_cache_pair(k_cache, v_cache)
    if query.dim() != 3:
        raise ValueError(f"query must be [B, Hq, D]; got {tuple(query.shape)}")
    batch_size, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"query head_dim {head_dim} does not match the cache's {k_cache.shape[3]}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"query heads Hq={num_heads} must be a multiple of the cache's KV heads Hkv={num_kv_heads}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch_size:
        raise ValueError(f"block_tables must be [B, max_blocks] with B={batch_size}; got {tuple(block_tables.shape)}")
    if context_lens.dim() != 1 or context_lens.shape[0] != batch_size:
        raise ValueError(f"context_lens must be [B] = [{batch_size}]; got {tuple(context_lens.shape)}")
    check_dtype("query", query, FLOAT_DTYPES)
    check_dtype("block_tables", block_tables, INDEX_DTYPES)
    check_dtype("context_lens", context_lens, INDEX_DTYPES)
    check_last_dim_contiguous(query=query)
    if not context_lens.is_contiguous():
        raise ValueError("context_lens must be contiguous")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite Python number; got {scale!r}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None; got {num_splits!r}")
    if tile_size is not None and (tile_size < _MIN_DOT or tile_size & (tile_size - 1)):
        raise ValueError(f"tile_size must be a power of two >= {_MIN_DOT}; got {tile_size}")
    check_same_device(_decode_split_kernel, query=query, k_cache=k_cache, v_cache=v_cache,
                      block_tables=block_tables, context_lens=context_lens)

"""Readable torch implementations of the KV-cache kernels. CPU runs these; Triton kernels are
tested against them.

Cache layout, one pair per layer: ``k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]``.
A token at position ``pos`` of a sequence lives in slot
``block_table[pos // block_size] * block_size + pos % block_size`` of the flattened cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new keys/values into their slots. key, value: [T, Hkv, D]; slot_mapping: [T] int64,
    where -1 means "do not write" (padding)."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    # index_copy_ is several times faster than advanced-index assignment on CPU.
    flat_k.index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    flat_v.index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def context_slots(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flattened cache slots of token ``positions`` ([B, L] or [L]) through ``block_tables``
    ([B, max_blocks] or [max_blocks])."""
    block_index = torch.div(positions, block_size, rounding_mode="floor")
    blocks = torch.gather(block_tables.long(), -1, block_index)
    return blocks * block_size + positions % block_size


def gather_context(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of the flattened cache at ``slots`` ([...]) -> [..., Hkv, D]."""
    num_kv_heads, head_dim = cache.shape[-2:]
    rows = torch.index_select(cache.view(-1, num_kv_heads, head_dim), 0, slots.reshape(-1))
    return rows.view(*slots.shape, num_kv_heads, head_dim)


def paged_attention_varlen(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of packed variable-length queries over a block-table cache.

    query: [T, Hq, D], the new tokens of B sequences concatenated (sequence i owns rows
    ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``); context_lens: [B], each sequence's length *including*
    its new tokens, whose K/V must already be in the cache. The new tokens are the last ones of
    the context, and attend causally. Returns [T, Hq, D].
    """
    block_size = k_cache.shape[1]
    out = torch.empty_like(query)
    for i in range(block_tables.shape[0]):
        start, end = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        context_len = int(context_lens[i])
        positions = torch.arange(context_len, device=query.device)
        slots = context_slots(block_tables[i], positions, block_size)
        out[start:end] = attend_one(query[start:end], gather_context(k_cache, slots),
                                    gather_context(v_cache, slots), scale)
    return out


def attend_one(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence: query [n, Hq, D] are the last n of the context key/value [c, Hkv, D]."""
    num_queries, context_len = query.shape[0], key.shape[0]
    q = query.transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
    k = key.to(query.dtype).transpose(0, 1).unsqueeze(0)  # [1, Hkv, c, D]
    v = value.to(query.dtype).transpose(0, 1).unsqueeze(0)
    if num_queries == context_len:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=num_queries > 1, scale=scale, enable_gqa=True)
    else:
        query_pos = torch.arange(context_len - num_queries, context_len, device=query.device)
        mask = torch.arange(context_len, device=query.device)[None, :] <= query_pos[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention, one query token per sequence: query [B, Hq, D] -> [B, Hq, D].

    Gathers every sequence's context padded to the longest one and masks the padding; this is
    the batched form CPU uses for decode steps and the reference of the Triton decode kernel.
    """
    block_size = k_cache.shape[1]
    max_len = int(context_lens.max())
    positions = torch.arange(max_len, device=query.device)
    valid = positions[None, :] < context_lens[:, None].to(query.device)  # [B, L]
    slots = context_slots(block_tables, torch.where(valid, positions, 0), block_size)
    return decode_from_slots(query, k_cache, v_cache, slots, valid, scale)


def decode_from_slots(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention given precomputed context slots [B, L] and their validity mask [B, L]."""
    k = gather_context(k_cache, slots).to(query.dtype).transpose(1, 2)  # [B, Hkv, L, D]
    v = gather_context(v_cache, slots).to(query.dtype).transpose(1, 2)
    q = query.unsqueeze(2)  # [B, Hq, 1, D]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True)
    return out[:, :, 0, :]

"""The torch implementations of the KV-cache kernels: what CPU serves with, and what the Triton
kernels are tested against.

Cache layout, one pair per layer: ``k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]``.
A token at position ``pos`` of a sequence lives in slot
``block_table[pos // block_size] * block_size + pos % block_size`` of the flattened cache.

Attention follows what transformers hands an attention function (``AttentionParams``): the
softmax scale, a sliding window, logit softcapping and per-head attention sinks, with the same
semantics as transformers' eager implementations (a window of ``W`` lets a query at position
``p`` see keys ``p - W < k <= p``; softcapping is applied to the scaled scores before masking;
a sink is an extra logit per head that joins the softmax's denominator and has no value).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionParams:
    """What one attention layer asks for. ``sinks``: [Hq] logits, or None."""

    scale: float
    sliding_window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    @property
    def needs_scores(self) -> bool:
        """True when SDPA cannot express the layer (softcapping or sinks change the softmax)."""
        return self.softcap is not None or self.sinks is not None


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    may_pad: bool = True,
) -> None:
    """Write new keys/values into their slots. key, value: [T, Hkv, D]; slot_mapping: [T] int64,
    where -1 means "do not write" (padding; ``may_pad=False`` says there is none)."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    if may_pad:
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


def first_key_position(context_len: int, num_queries: int, sliding_window: int | None) -> int:
    """The earliest key any of the last ``num_queries`` positions of a context attends to."""
    if sliding_window is None:
        return 0
    return max(0, context_len - num_queries - sliding_window + 1)


def decode_positions(context_lens: torch.Tensor, sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions [B, L] each decoding sequence attends to (its window, or its whole context)
    and their validity [B, L]; invalid entries point at position 0. ``context_lens`` [B] include
    the new token."""
    lens = context_lens.long()
    longest = int(lens.max()) if lens.numel() else 0
    width = longest if sliding_window is None else min(longest, sliding_window)
    start = (lens - width).clamp(min=0) if sliding_window is not None else torch.zeros_like(lens)
    positions = start[:, None] + torch.arange(width, device=lens.device)[None, :]
    valid = positions < lens[:, None]
    return torch.where(valid, positions, 0), valid


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
              params: AttentionParams, is_causal: bool = False) -> torch.Tensor:
    """query [B, Hq, n, D], key/value [B, Hkv, L, D], mask [B or 1, 1, n, L] (True = attend) or
    None -> [B, Hq, n, D]. SDPA when it can express the layer and there is more than one query
    per sequence; explicit fp32 scores otherwise.

    NOTE: single-query (decode) attention never goes to SDPA: on CPU its flash kernel handles one
    query row per sequence badly, worst in bf16 (measured with 1 thread, 32 sequences of 100
    tokens, 9 query / 3 KV heads of 64: 2.40 ms in bf16 against 0.18 ms for these explicit
    scores; fp32 0.31 against 0.27)."""
    key, value = key.to(query.dtype), value.to(query.dtype)
    if not params.needs_scores and query.shape[2] > 1:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal,
                                              scale=params.scale, enable_gqa=True)
    batch, num_heads, num_queries, head_dim = query.shape
    num_kv_heads, num_keys = key.shape[1], key.shape[2]
    # Group the query heads of each KV head so K/V are never expanded per query head.
    grouped = query.float().reshape(batch, num_kv_heads, -1, head_dim)  # [B, Hkv, G * n, D]
    scores = torch.matmul(grouped, key.float().transpose(-1, -2)).view(batch, num_heads, num_queries, num_keys)
    scores = scores * params.scale
    if params.softcap is not None:
        scores = torch.tanh(scores / params.softcap) * params.softcap
    if is_causal:
        mask = torch.ones(num_queries, num_keys, dtype=torch.bool, device=query.device).tril(num_keys - num_queries)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if params.sinks is not None:
        sinks = params.sinks.float().view(1, num_heads, 1, 1).expand(batch, num_heads, num_queries, 1)
        probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.reshape(batch, num_kv_heads, -1, num_keys), value.float())
    return out.view(batch, num_heads, num_queries, head_dim).to(query.dtype)


def attend_one(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: AttentionParams,
               key_start: int = 0) -> torch.Tensor:
    """One sequence: query [n, Hq, D] are the last n positions of a context whose keys/values
    [c, Hkv, D] hold positions ``key_start .. key_start + c - 1``. Returns [n, Hq, D]."""
    num_queries, num_keys = query.shape[0], key.shape[0]
    context_len = key_start + num_keys
    q = query.transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
    k = key.transpose(0, 1).unsqueeze(0)  # [1, Hkv, c, D]
    v = value.transpose(0, 1).unsqueeze(0)
    window = params.sliding_window
    if key_start == 0 and num_queries == num_keys and (window is None or window >= num_keys):
        return attention(q, k, v, None, params, is_causal=num_queries > 1)[0].transpose(0, 1)
    query_pos = torch.arange(context_len - num_queries, context_len, device=query.device)[:, None]
    key_pos = torch.arange(key_start, context_len, device=query.device)[None, :]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return attention(q, k, v, mask[None, None], params)[0].transpose(0, 1)


def head_major_rows(slots: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Rows of the cache viewed as [slots * num_kv_heads, head_dim] that hold each KV head's
    keys at ``slots`` [B, L], ordered [B, num_kv_heads, L] (flattened)."""
    heads = torch.arange(num_kv_heads, device=slots.device)
    return (slots[:, None, :] * num_kv_heads + heads[None, :, None]).reshape(-1)


def decode_from_slots(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor | None,
    params: AttentionParams,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention given the context slots [B, L] each query attends to and their validity
    mask [B, L] (None: every slot is valid): query [B, Hq, D] -> [B, Hq, D]. ``rows``:
    ``head_major_rows(slots, Hkv)`` when the caller has it already (it is the same for every
    layer of a step).

    Keys and values are gathered head-major ([B, Hkv, L, D], no transposed copies) in the cache's
    dtype; the two products run in that dtype (with fp32 accumulation inside; bf16 scores are
    rounded to bf16 once, as bf16 activations are everywhere else in such a model); scale,
    softcap, mask, sinks and softmax in fp32.

    NOTE: measured with 1 thread, 32 sequences of 100 tokens, 9 query / 3 KV heads of 64, bf16:
    0.3 ms against 5.3 ms for a token-major gather with fp32 conversions, and 2.4 ms for SDPA
    (whose CPU flash kernel handles one query row per sequence badly).
    """
    batch, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[-2]
    width = slots.shape[1]
    if rows is None:
        rows = head_major_rows(slots, num_kv_heads)
    k = torch.index_select(k_cache.view(-1, head_dim), 0, rows).view(batch, num_kv_heads, width, head_dim)
    v = torch.index_select(v_cache.view(-1, head_dim), 0, rows).view(batch, num_kv_heads, width, head_dim)
    # Query heads h = kv * group + g share KV head kv (transformers' repeat_kv).
    grouped = query.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim).to(k.dtype)
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * params.scale  # [B, Hkv, G, L]
    if params.softcap is not None:
        scores = torch.tanh(scores / params.softcap) * params.softcap
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    if params.sinks is not None:
        sinks = params.sinks.float().view(1, num_kv_heads, -1, 1).expand(batch, -1, -1, 1)
        probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(v.dtype), v)  # [B, Hkv, G, D]
    return out.reshape(batch, num_heads, head_dim).to(query.dtype)


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention, one query token per sequence: query [B, Hq, D] -> [B, Hq, D].

    Gathers every sequence's context (or its window) padded to the longest one and masks the
    padding; this is the batched form CPU uses for decode steps and the reference of the Triton
    decode kernel, whose signature it shares.
    """
    block_size = k_cache.shape[1]
    positions, valid = decode_positions(context_lens.to(query.device), sliding_window)
    slots = context_slots(block_tables, positions, block_size)
    params = AttentionParams(scale, sliding_window, softcap, sinks)
    return decode_from_slots(query, k_cache, v_cache, slots, valid, params)

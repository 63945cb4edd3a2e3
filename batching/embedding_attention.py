"""Attention for embedding models over packed texts: no padding, no KV cache.

The texts of a batch are concatenated into one row (``input_ids [1, T]``, positions restarting
at 0 for each text) and every attention layer attends each text to itself only: bidirectionally
for encoders (BERT family), causally for decoders used as embedders (``module.is_causal``). The
text boundaries travel in a ``PackedTexts`` installed with ``packed_texts(...)`` around the
forward. Without one, the function is plain SDPA over a padded batch with its mask, the fallback
for models whose packed forward does not match their padded one (``batching.embedding_model``).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_NAME = "lmi_packed_texts"
# Arguments that would change what a layer computes and that the packed path does not implement.
_REFUSED_KWARGS = ("sliding_window", "softcap", "s_aux", "sinks")


class UnsupportedPackedAttention(ValueError):
    """A layer asks for something the packed path does not compute (the model is served padded)."""


@dataclass(frozen=True)
class PackedTexts:
    """Where each text starts and ends in the packed row: ``cu_seqlens [num_texts + 1]``."""

    cu_seqlens: tuple[int, ...]

    @classmethod
    def of(cls, lengths: list[int]) -> "PackedTexts":
        offsets = [0]
        for length in lengths:
            offsets.append(offsets[-1] + length)
        return cls(tuple(offsets))

    def spans(self) -> list[tuple[int, int]]:
        return list(zip(self.cu_seqlens[:-1], self.cu_seqlens[1:]))


_current: ContextVar[PackedTexts | None] = ContextVar("packed_texts", default=None)


@contextmanager
def packed_texts(texts: PackedTexts):
    """Install ``texts`` for the forward inside the block; refuses nesting."""
    if _current.get() is not None:
        raise RuntimeError("packed_texts contexts do not nest")
    token = _current.set(texts)
    try:
        yield
    finally:
        _current.reset(token)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, heads, T, head_dim], key/value [1, kv_heads, T, head_dim] -> ([1, T, heads, head_dim], None)."""
    texts = _current.get()
    if texts is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    refused = [name for name in _REFUSED_KWARGS if kwargs.get(name) is not None]
    if refused:
        raise UnsupportedPackedAttention(f"the packed path does not compute {', '.join(refused)}")
    if key.shape[1] != query.shape[1]:  # grouped-query attention
        repeats = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    causal = bool(getattr(module, "is_causal", False))
    out = torch.empty_like(query)
    for start, end in texts.spans():
        out[:, :, start:end] = F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], is_causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention function (and SDPA's mask builder for the padded fallback) under
    ``ATTENTION_NAME``; idempotent. Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return ATTENTION_NAME

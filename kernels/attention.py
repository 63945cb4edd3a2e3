"""The attention function the project plugs into unmodified Hugging Face models.

Registered with transformers' ``AttentionInterface`` under ``ATTENTION_NAME``. Every layer call
writes the new K/V into the block-table cache through ``slot_mapping`` and attends each sequence's
new queries to its whole cached context. Per-step state travels in an explicit
``AttentionMetadata`` passed as a keyword argument of ``model(...)``; transformers hands extra
keyword arguments to this function unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels import reference

ATTENTION_NAME = "lmi_paged"


@dataclass
class AttentionMetadata:
    """Tensors describing one packed step, built once per step by the model runner.

    Sequences are ordered decodes first (one new token each), then prefills (one chunk each).
    """

    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V is written
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32: length of each sequence after this step
    cu_seqlens_q: list[int]  # [B + 1] query offsets into the packed tokens (host side)
    context_lens_host: list[int]  # same as context_lens, host side
    num_decodes: int  # the first num_decodes sequences have exactly one new token
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v [num_blocks, block_size, Hkv, D]
    backend: "AttentionBackend"
    # Backend-private tensors derived once per step (for example gather indices).
    prepared: dict = field(default_factory=dict)

    @property
    def num_decode_tokens(self) -> int:
        return self.cu_seqlens_q[self.num_decodes]


class AttentionBackend:
    """Torch reference backend: what CPU runs. Decodes are batched into one gather + SDPA; each
    prefill chunk attends on its own (a fresh prompt without cached context skips the gather)."""

    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> None:
        """Derive gather indices once per step (shared by all layers)."""
        if meta.num_decodes == 0:
            return
        lens = meta.context_lens[: meta.num_decodes].long()
        positions = torch.arange(int(max(meta.context_lens_host[: meta.num_decodes])), device=lens.device)
        valid = positions[None, :] < lens[:, None]
        block_size = meta.kv_caches[0][0].shape[1]
        tables = meta.block_tables[: meta.num_decodes]
        meta.prepared["decode_slots"] = reference.context_slots(tables, torch.where(valid, positions, 0), block_size)
        meta.prepared["decode_valid"] = valid

    def write(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        reference.write_kv(key, value, k_cache, v_cache, slot_mapping)

    def decode(self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        slots, valid = meta.prepared["decode_slots"], meta.prepared["decode_valid"]
        return reference.decode_from_slots(query, k_cache, v_cache, slots, valid, scale)

    def prefill(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, index: int, scale: float):
        """Sequence ``index``'s chunk: query/key/value are its new tokens [n, H, D]."""
        context_len = meta.context_lens_host[index]
        if context_len == query.shape[0]:  # nothing cached before this chunk
            return reference.attend_one(query, key, value, scale)
        block_size = k_cache.shape[1]
        positions = torch.arange(context_len, device=query.device)
        slots = reference.context_slots(meta.block_tables[index], positions, block_size)
        return reference.attend_one(query, reference.gather_context(k_cache, slots),
                                    reference.gather_context(v_cache, slots), scale)


class TritonBackend(AttentionBackend):
    """CUDA: Triton K/V write and split-K paged decode; prefill stays gather + SDPA."""

    name = "triton"

    def prepare(self, meta: AttentionMetadata) -> None:
        pass

    def write(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        from kernels import triton_write_kv

        triton_write_kv.write_kv(key, value, k_cache, v_cache, slot_mapping)

    def decode(self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        from kernels import triton_decode

        n = meta.num_decodes
        return triton_decode.paged_decode_attention(
            query, k_cache, v_cache, meta.block_tables[:n], meta.context_lens[:n], scale)


def select_backend(device: torch.device) -> AttentionBackend:
    """The one place that picks kernels: Triton on CUDA, the torch reference elsewhere."""
    if device.type == "cuda":
        return TritonBackend()
    return AttentionBackend()


def lmi_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                  attn_metadata: AttentionMetadata | None = None, **kwargs):
    """transformers attention interface: query [1, Hq, T, D], key/value [1, Hkv, T, D] (new tokens
    only) -> ([1, T, Hq, D], None)."""
    if attn_metadata is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention needs attn_metadata; the model runner passes it")
    meta = attn_metadata
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    k = key[0].transpose(0, 1)  # [T, Hkv, D]
    v = value[0].transpose(0, 1)
    k_cache, v_cache = meta.kv_caches[module.layer_idx]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    meta.backend.write(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    split = meta.num_decode_tokens
    if meta.num_decodes:
        out[:split] = meta.backend.decode(q[:split], k_cache, v_cache, meta, scale)
    cu = meta.cu_seqlens_q
    for i in range(meta.num_decodes, len(cu) - 1):
        rows = slice(cu[i], cu[i + 1])
        out[rows] = meta.backend.prefill(q[rows], k[rows], v[rows], k_cache, v_cache, meta, i, scale)
    return out.unsqueeze(0), None


def register() -> str:
    """Register the attention function with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, lmi_attention)
    return ATTENTION_NAME

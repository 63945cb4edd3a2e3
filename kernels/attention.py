"""The attention function the project plugs into unmodified Hugging Face models.

Registered with transformers' ``AttentionInterface`` under ``ATTENTION_NAME``. Every layer call
writes the new K/V into the block-table cache through ``slot_mapping`` and attends each sequence's
new queries to its cached context, honouring what the layer asks for (``scaling``,
``sliding_window``, ``softcap``, attention sinks). Anything else a model hands over that would
change the result is refused with ``UnsupportedAttention``, never ignored.

Per-step state travels in an explicit ``AttentionMetadata`` that the model runner installs with
``step_context(...)`` around its forward call. NOTE: a context rather than a keyword argument of
``model(...)``: some decoder layers do not forward keyword arguments to their attention module,
and the metadata must reach every layer of every model.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from kernels import reference
from kernels.reference import AttentionParams

ATTENTION_NAME = "lmi_paged"

# Keyword arguments transformers' modeling code hands the attention function that do not change
# the result for a decoder in eval mode with this engine's inputs.
_NEUTRAL_KWARGS = frozenset({"dropout", "position_ids", "use_cache", "output_router_logits", "output_attentions",
                             "cache_position", "past_key_values", "past_key_value", "return_dict", "token_type_ids"})
_HONOURED_KWARGS = frozenset({"sliding_window", "softcap", "s_aux", "sinks"})


class UnsupportedAttention(ValueError):
    """A model asks its attention function for something this engine does not compute."""


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
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # by layer_idx: k, v [num_blocks, block_size, Hkv, D]
    backend: "TorchBackend"
    # Backend-private tensors derived once per step and shared by the layers (gather indices
    # per sliding window).
    prepared: dict = field(default_factory=dict)

    @property
    def num_decode_tokens(self) -> int:
        return self.cu_seqlens_q[self.num_decodes]


@dataclass(frozen=True)
class LayerSpec:
    """What one attention layer was seen to compute in the discovery forward."""

    layer_idx: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    sliding_window: int | None
    softcap: float | None
    has_sinks: bool


class LayerDiscovery:
    """Per-step state of the discovery forward (``batching.model_check``): records every layer's
    KV shape and attention parameters, and attends the probe tokens to each other without a
    cache, so the forward runs to its end."""

    def __init__(self) -> None:
        self.layers: dict[int, LayerSpec] = {}
        self.problems: list[str] = []

    def attend(self, module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams):
        layer_idx = getattr(module, "layer_idx", None)
        if not isinstance(layer_idx, int):
            self.problems.append(f"attention module {type(module).__name__} has no integer layer_idx")
        elif layer_idx in self.layers:
            self.problems.append(f"layer_idx {layer_idx} computed attention twice in one forward (shared KV)")
        else:
            self.layers[layer_idx] = LayerSpec(layer_idx, k.shape[1], k.shape[2], k.dtype, params.sliding_window,
                                               params.softcap, params.sinks is not None)
        return reference.attend_one(q, k, v, params)


class TorchBackend:
    """The torch implementation: what CPU runs. Decodes are batched, in groups of similar context
    length (``length_groups``), into one head-major gather and two products per group; each
    prefill chunk attends on its own (a fresh prompt without cached context skips the gather)."""

    name = "torch"

    def attends_whole_steps(self, k_cache: torch.Tensor) -> bool:
        """Whether ``attend_step`` serves steps with prefills on this cache (one call for all tokens)."""
        return False

    def write(self, key, value, k_cache, v_cache, meta: AttentionMetadata) -> None:
        # Whether the step has padding slots (-1) is decided once per step, not in every layer.
        padded = meta.prepared.get("padded_slots")
        if padded is None:
            padded = meta.prepared["padded_slots"] = not bool((meta.slot_mapping >= 0).all())
        reference.write_kv(key, value, k_cache, v_cache, meta.slot_mapping, may_pad=padded)

    def decode(self, query, k_cache, v_cache, meta: AttentionMetadata, params: AttentionParams) -> torch.Tensor:
        groups = self._decode_groups(meta, params.sliding_window, k_cache.shape[1], k_cache.shape[2])
        if len(groups) == 1:
            _, slots, valid, rows = groups[0]
            return reference.decode_from_slots(query, k_cache, v_cache, slots, valid, params, rows)
        out = torch.empty_like(query)
        for members, slots, valid, rows in groups:
            out[members] = reference.decode_from_slots(query[members], k_cache, v_cache, slots, valid, params, rows)
        return out

    @staticmethod
    def _decode_groups(meta: AttentionMetadata, window: int | None, block_size: int, num_kv_heads: int):
        """The decoding sequences in groups of similar length (``length_groups``), each with the
        gather indices of its contexts (or windows) padded to its own longest: once per step and
        layer shape. Each group: (member rows or None for all, slots, valid, head-major rows)."""
        key = ("decode_groups", window, block_size, num_kv_heads)
        if key not in meta.prepared:
            n = meta.num_decodes
            lengths = [min(length, window) if window else length for length in meta.context_lens_host[:n]]
            groups = []
            for members in length_groups(lengths):
                index = None if len(members) == n else torch.tensor(members, device=meta.context_lens.device)
                lens = meta.context_lens[:n] if index is None else meta.context_lens[index]
                tables = meta.block_tables[:n] if index is None else meta.block_tables[index]
                positions, valid = reference.decode_positions(lens, window)
                slots = reference.context_slots(tables, positions, block_size)
                if bool(valid.all()):  # no padding in this group: no mask to apply in every layer
                    valid = None
                groups.append((index, slots, valid, reference.head_major_rows(slots, num_kv_heads)))
            meta.prepared[key] = groups
        return meta.prepared[key]

    def prefill(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, index: int,
                params: AttentionParams) -> torch.Tensor:
        """Sequence ``index``'s chunk: query/key/value are its new tokens [n, H, D]."""
        context_len, num_queries = meta.context_lens_host[index], query.shape[0]
        start = reference.first_key_position(context_len, num_queries, params.sliding_window)
        if start >= context_len - num_queries:  # every key it needs is among the new tokens
            new_start = start - (context_len - num_queries)
            return reference.attend_one(query, key[new_start:], value[new_start:], params, key_start=start)
        positions = torch.arange(start, context_len, device=query.device)
        slots = reference.context_slots(meta.block_tables[index], positions, k_cache.shape[1])
        return reference.attend_one(query, reference.gather_context(k_cache, slots),
                                    reference.gather_context(v_cache, slots), params, key_start=start)


class NativeCpuBackend(TorchBackend):
    """CPU with the project's compiled kernels (kernels/cpu_native.py): decode attention reads the
    block-table cache in place (no per-layer gather of padded contexts); new keys and values go
    to their slots in one compiled call per layer (``write_kv``; torch's ``index_copy_`` for
    other dtypes or layouts).

    Prefill: on bf16 caches with head sizes 64 and 128 where the kernel has its AVX512-BF16 vector
    code, the whole step (decodes and prefill chunks, cached context included) is one kernel call
    per layer: each new token is a query row over its own sequence's blocks, its context ending at
    its own position (the causal mask, windows, softcapping and sinks as in decode). That is 2-3x
    faster than torch's CPU SDPA on prompts of 16 to 1024 tokens here (docs/benchmarks.md). Other
    dtypes and head sizes keep torch's SDPA for prefill: the generic kernel reads every key once
    per query row, slower than SDPA's tiles on long prompts."""

    name = "native-cpu"

    def __init__(self, module):
        self.module = module
        self.vector_bf16 = module.avx512_bf16()

    def write(self, key, value, k_cache, v_cache, meta: AttentionMetadata) -> None:
        if (key.dtype == value.dtype == k_cache.dtype and key.stride(-1) == 1 and value.stride(-1) == 1
                and meta.slot_mapping.dtype == torch.int64):
            self.module.write_kv(key, value, k_cache, v_cache, meta.slot_mapping)  # one call, -1 slots skipped
        else:
            super().write(key, value, k_cache, v_cache, meta)

    def decode(self, query, k_cache, v_cache, meta: AttentionMetadata, params: AttentionParams) -> torch.Tensor:
        n = meta.num_decodes
        return self._kernel(query, k_cache, v_cache, meta.block_tables[:n], meta.context_lens[:n], params)

    def attends_whole_steps(self, k_cache: torch.Tensor) -> bool:
        return self.vector_bf16 and k_cache.dtype == torch.bfloat16 and k_cache.shape[-1] in (64, 128)

    def attend_step(self, query, k_cache, v_cache, meta: AttentionMetadata, params: AttentionParams) -> torch.Tensor:
        """Every new token of the step [T, Hq, D] against its sequence's cache, in one call."""
        rows = meta.prepared.get("token_rows")
        if rows is None:
            device = meta.block_tables.device
            cu = torch.tensor(meta.cu_seqlens_q, device=device)
            counts = cu[1:] - cu[:-1]
            tables = torch.repeat_interleave(meta.block_tables, counts, dim=0)
            # a token's context ends at its own position: context_len - (new tokens after it)
            after = torch.repeat_interleave(cu[1:], counts) - 1 - torch.arange(int(cu[-1]), device=device)
            lens = (torch.repeat_interleave(meta.context_lens.long(), counts) - after).to(torch.int32)
            rows = meta.prepared["token_rows"] = (tables, lens)
        return self._kernel(query, k_cache, v_cache, rows[0], rows[1], params)

    def _kernel(self, query, k_cache, v_cache, tables, lens, params: AttentionParams) -> torch.Tensor:
        out = self.module.paged_decode(query.to(k_cache.dtype), k_cache, v_cache, tables, lens, params.scale,
                                       params.sliding_window or 0, params.softcap or 0.0, params.sinks)
        return out.to(query.dtype)


class TritonBackend(TorchBackend):
    """CUDA: Triton K/V write and split-K paged decode; prefill is the torch gather + SDPA."""

    name = "triton"

    def write(self, key, value, k_cache, v_cache, meta: AttentionMetadata) -> None:
        from kernels import triton_write_kv

        triton_write_kv.write_kv(key, value, k_cache, v_cache, meta.slot_mapping)

    def decode(self, query, k_cache, v_cache, meta: AttentionMetadata, params: AttentionParams) -> torch.Tensor:
        from kernels import triton_decode

        n = meta.num_decodes
        return triton_decode.paged_decode_attention(
            query, k_cache, v_cache, meta.block_tables[:n], meta.context_lens[:n], params.scale,
            sliding_window=params.sliding_window, softcap=params.softcap, sinks=params.sinks)


# Decode rows are padded to the longest context of their group; a group closes when the next
# (shorter) context would leave more than half of the group's width as padding and at least
# GROUP_MIN_PADDING tokens of it. At most MAX_DECODE_GROUPS groups (each costs a gather and two
# products per layer).
GROUP_MIN_PADDING = 64
MAX_DECODE_GROUPS = 4


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of ``lengths`` grouped so that padding each group to its longest wastes at most
    about half of it (see the constants above); one group when the lengths are close."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups) < MAX_DECODE_GROUPS:
            widest = lengths[groups[-1][0]]
            if lengths[i] * 2 < widest and widest - lengths[i] >= GROUP_MIN_PADDING:
                groups.append([i])
                continue
        if not groups:
            groups.append([i])
        else:
            groups[-1].append(i)
    if len(groups) == 1:
        return [list(range(len(lengths)))]  # keep the step's own order: no reindexing at all
    return groups


def select_backend(device: torch.device) -> TorchBackend:
    """The one place that picks kernels: Triton on CUDA; on CPU the compiled kernels where they
    build (``LMI_CPU_KERNELS``, kernels/cpu_native.py), else the torch implementation."""
    if device.type == "cuda":
        return TritonBackend()
    if device.type == "cpu":
        from kernels import cpu_native

        module = cpu_native.load()
        if module is not None:
            return NativeCpuBackend(module)
    return TorchBackend()


# ---- the per-step context ------------------------------------------------------------------
_active = threading.local()


@contextmanager
def step_context(step: AttentionMetadata | LayerDiscovery):
    """Make ``step`` the state every attention layer of the forward inside reads. Refuses nesting."""
    if getattr(_active, "step", None) is not None:
        raise RuntimeError("an attention step is already active on this thread")
    _active.step = step
    try:
        yield step
    finally:
        _active.step = None


def layer_params(module, query: torch.Tensor, attention_mask, scaling, kwargs: dict) -> AttentionParams:
    """The layer's attention parameters; raises ``UnsupportedAttention`` for anything that would
    change the result and that this engine does not compute."""
    if attention_mask is not None:
        raise UnsupportedAttention("the model passes its own attention mask or bias (for example ALiBi), "
                                   "which this engine does not apply")
    for name, value in kwargs.items():
        if name in _HONOURED_KWARGS or name in _NEUTRAL_KWARGS or value is None:
            continue
        if name == "is_causal" and value:
            continue
        raise UnsupportedAttention(f"the model's attention passes {name}={_describe(value)}, which this engine "
                                   "does not implement")
    window = kwargs.get("sliding_window")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise UnsupportedAttention(f"sliding_window={window!r} is not a positive number of tokens")
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = kwargs.get("sinks")
    softcap = kwargs.get("softcap") or None
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    return AttentionParams(scale, window, float(softcap) if softcap else None, sinks)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)}>"
    return repr(value)[:60]


def lmi_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query [1, Hq, T, D], key/value [1, Hkv, T, D] (new tokens
    only) -> ([1, T, Hq, D], None)."""
    step = getattr(_active, "step", None)
    if step is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention runs only inside the model runner's step_context")
    params = layer_params(module, query, attention_mask, scaling, kwargs)
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    k = key[0].transpose(0, 1)  # [T, Hkv, D]
    v = value[0].transpose(0, 1)
    if isinstance(step, LayerDiscovery):
        return step.attend(module, q, k, v, params).unsqueeze(0), None
    return attend(step, module.layer_idx, q, k, v, params).unsqueeze(0), None


def attend(meta: AttentionMetadata, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           params: AttentionParams) -> torch.Tensor:
    """One layer of one step: write the new tokens' K/V [T, Hkv, D] into layer ``layer_idx``'s
    cache and attend the queries [T, Hq, D] to their sequences' contexts -> [T, Hq, D]."""
    k_cache, v_cache = meta.kv_caches[layer_idx]
    meta.backend.write(k, v, k_cache, v_cache, meta)
    if meta.num_decodes == len(meta.cu_seqlens_q) - 1:  # a decode-only step: no reassembly
        return meta.backend.decode(q, k_cache, v_cache, meta, params)
    if meta.backend.attends_whole_steps(k_cache):
        return meta.backend.attend_step(q, k_cache, v_cache, meta, params)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    split = meta.num_decode_tokens
    if meta.num_decodes:
        out[:split] = meta.backend.decode(q[:split], k_cache, v_cache, meta, params)
    cu = meta.cu_seqlens_q
    for i in range(meta.num_decodes, len(cu) - 1):
        rows = slice(cu[i], cu[i + 1])
        out[rows] = meta.backend.prefill(q[rows], k[rows], v[rows], k_cache, v_cache, meta, i, params)
    return out


def register() -> str:
    """Register the attention function with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, lmi_attention)
    return ATTENTION_NAME

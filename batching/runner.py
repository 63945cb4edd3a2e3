"""The model runner: owns the model, the tokenizer and the physical KV tensors, and executes one
packed batch per step through the project's attention function (kernels/attention.py)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from batching import host_memory, lean_forward, model_check, packed_linear, quantize as quantization, tensor_parallel
from batching.scheduler import SchedulerOutput
from kernels import attention
from kernels.attention import LayerSpec

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def read_cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere). Our machines differ:
    some have AVX512-BF16, some only AVX2, so features are read, never assumed."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@dataclass(frozen=True)
class KVLayout:
    """Shape of the KV cache of one model, per attention layer, independent of how it is cut into
    blocks. Taken from the layers as they compute (``model_check.discover_layers``)."""

    layers: tuple[LayerSpec, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def bytes_per_token(self) -> int:
        return sum(2 * layer.num_kv_heads * layer.head_dim * torch.finfo(layer.dtype).bits // 8
                   for layer in self.layers)


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(requested: str, device: torch.device, config, cpu_flags: frozenset[str] | None = None) -> torch.dtype:
    """``auto``: on CUDA the checkpoint's dtype (bf16 for fp32 checkpoints); on a CPU that computes
    bf16 natively (AVX512-BF16 or AMX-BF16) bf16, which halves the weight bytes every step reads
    (small batches are bound by them) and runs its matrix products about twice as fast as fp32;
    on other CPUs fp32, since emulated bf16 is slower there."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type != "cuda":
        flags = cpu_flags if cpu_flags is not None else read_cpu_flags()
        return torch.bfloat16 if flags & NATIVE_BF16_FLAGS else torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return stored if isinstance(stored, torch.dtype) and stored != torch.float32 else torch.bfloat16


class ModelRunner:
    """Loads a causal LM once and proves it is served exactly (``batching.model_check``: raises
    ``UnsupportedModelError`` otherwise); then ``allocate_kv_cache`` and ``execute`` each step."""

    def __init__(self, model_path: str, *, dtype: str = "auto", device: str | None = None,
                 quantize: str | None = None, trust_remote_code: bool = False, revision: str | None = None,
                 tensor_parallel_degree: int = 1, group: "tensor_parallel.Group | None" = None):
        """``tensor_parallel_degree > 1``: this process becomes rank 0 of a new group and starts the
        other ranks; ``group``: this process is a rank of an existing group (batching.tensor_parallel)."""
        from transformers import AutoConfig

        self.device = pick_device(device)
        if self.device.type == "cpu":
            host_memory.keep_freed_memory()
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code, revision=revision)
        self.dtype = pick_dtype(dtype, self.device, config)
        quantization.check_scheme(quantize, self.device, group.world_size if group else tensor_parallel_degree)
        self.quantize = quantize
        self.quantize_report: quantization.QuantizeReport | None = None
        model_check.check_model_class(config)
        if tensor_parallel_degree > 1 or group is not None:
            model_check.check_tensor_parallel_plan(config, group.world_size if group else tensor_parallel_degree)
        if group is None and tensor_parallel_degree > 1:
            group = tensor_parallel.start_leader(tensor_parallel_degree, model_path, dtype=dtype,
                                                 device_type=self.device.type, trust_remote_code=trust_remote_code,
                                                 revision=revision, first_device=self.device.index or 0)
        self.group = group
        try:
            self._load(model_path, config, trust_remote_code, revision)
        except BaseException:
            self.close()
            raise

    def _load(self, model_path: str, config, trust_remote_code: bool, revision: str | None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        if self.group is not None:
            self.device = self.group.device
            # transformers shards each layer by its own plan; attention then sees this rank's heads.
            from transformers.distributed import DistributedConfig

            self.model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=self.dtype, attn_implementation=attention.register(),
                distributed_config=DistributedConfig(tp_plan="auto", tp_size=self.group.world_size),
                trust_remote_code=trust_remote_code, revision=revision).eval()
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=self.dtype, attn_implementation=attention.register(),
                trust_remote_code=trust_remote_code, revision=revision).to(self.device).eval()
        # The engine's own forward (batching.lean_forward) on CPU: q/k/v and gate/up fused before
        # quantizing and prepacking, which then apply to the fused layers.
        family = lean_forward.fuse_projections(self.model) if self.device.type == "cpu" and self.group is None else None
        if self.quantize:
            # Before the checks below, so they verify the model as it will serve.
            self.quantize_report = quantization.quantize_model(self.model, self.quantize)
        if self.device.type == "cpu" and self.group is None:
            packed_linear.pack_model(self.model)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code, revision=revision)
        try:
            self.generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:
            self.generation_config = GenerationConfig.from_model_config(config)
        self.backend = attention.select_backend(self.device)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = 0
        self.layout = KVLayout(tuple(model_check.discover_layers(self.model)))
        self.rope_limit = model_check.static_rope_limit(self.model)
        self.lean: lean_forward.LeanForward | None = None
        if family is not None:
            try:
                from kernels import cpu_native

                self.lean = lean_forward.LeanForward(self.model, family, list(self.layout.layers),
                                                     native=cpu_native.load())
            except ValueError as error:
                logger.info("transformers' forward serves this model (%s)", error)
        try:
            model_check.verify(self)
        except Exception as error:  # NOTE: whatever fails in the own forward, transformers' is tried
            if self.lean is None:
                raise
            # Never served wrong: the model's own forward is checked the same way next.
            logger.warning("the engine's own forward disagrees with the model's eager forward (%s); "
                           "serving through transformers' forward instead", error)
            self.lean = None
            model_check.verify(self)

    # ---- facts about the model -----------------------------------------------------------
    @property
    def max_position_embeddings(self) -> int:
        text_config = self.model.config.get_text_config()
        return int(getattr(text_config, "max_position_embeddings", 2048))

    @property
    def eos_token_ids(self) -> set[int]:
        """Every EOS id of the generation config (falling back to the tokenizer's)."""
        ids = self.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return set()
        return set(ids) if isinstance(ids, (list, tuple)) else {int(ids)}

    # ---- the KV cache ----------------------------------------------------------------------
    def kv_capacity_tokens(self, explicit: int | None, gpu_memory_utilization: float, default_cpu: int) -> int:
        """The one capacity knob, in tokens: explicit if set, else measured on CUDA, else a
        CPU default bounded by a quarter of host memory."""
        if explicit is not None:
            return explicit
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * gpu_memory_utilization - (total - free)
            return max(0, int(budget // self.layout.bytes_per_token))
        host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return min(default_cpu, int(host_bytes // 4 // self.layout.bytes_per_token))

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """One (k, v) pair per layer: [num_blocks, block_size, num_kv_heads, head_dim] (each layer
        with its own KV heads and head size; under tensor parallelism, this rank's heads on every
        rank of the group)."""
        if isinstance(self.group, tensor_parallel.Leader):
            self.group.send_allocate(num_blocks, block_size)
        self.allocate_local_kv_cache(num_blocks, block_size)

    def allocate_local_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """``allocate_kv_cache`` on this rank only."""
        self.release_kv_cache()
        self.kv_caches = []
        # On CPU the cache lives in huge pages, as the packed weights do: a step streams it too.
        arena = host_memory.HugePageArena() if self.device.type == "cpu" else None

        def zeros(shape, dtype):
            if arena is None:
                return torch.zeros(shape, dtype=dtype, device=self.device)
            return arena.empty(math.prod(shape), dtype).zero_().view(shape)

        for layer in self.layout.layers:
            shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
            self.kv_caches.append((zeros(shape, layer.dtype), zeros(shape, layer.dtype)))
        self.block_size = block_size
        logger.info("KV cache: %d blocks x %d tokens, %.1f MiB", num_blocks, block_size,
                    num_blocks * block_size * self.layout.bytes_per_token / 2**20)

    def release_kv_cache(self) -> None:
        self.kv_caches = []
        self.block_size = 0

    # ---- one step ------------------------------------------------------------------------------
    def execute(self, batch: SchedulerOutput) -> torch.Tensor:
        """Run the packed batch; logits [num sampling sequences, vocab] in the model's dtype (see forward)."""
        inputs = self.prepare_step(batch)
        if isinstance(self.group, tensor_parallel.Leader):
            self.group.send_step(*inputs.to_broadcast())
        return self.forward(inputs, inputs.logits_indices)

    def close(self) -> None:
        """Stop the other ranks of this runner's tensor-parallel group (rank 0 only)."""
        if isinstance(self.group, tensor_parallel.Leader):
            self.group.close()

    @torch.inference_mode()
    def forward(self, inputs: "StepInputs", logits_indices: torch.Tensor) -> torch.Tensor:
        """The model over one packed step; logits [len(logits_indices), vocab] in the dtype the
        model gives them (the sampler computes in float32, except its greedy pass on CPU, which
        reads them as they are)."""
        if self.lean is not None:
            return self.lean(inputs.input_ids, inputs.position_ids, logits_indices, inputs.metadata)
        with attention.step_context(inputs.metadata):
            out = self.model(input_ids=inputs.input_ids, position_ids=inputs.position_ids, use_cache=False,
                             logits_to_keep=logits_indices)
        return out.logits[0]

    def prepare_step(self, batch: SchedulerOutput) -> "StepInputs":
        """Device tensors and attention metadata of a scheduled batch (decodes first)."""
        block_size = self.block_size
        input_ids, positions, slots, context_lens, cu_seqlens, logits_indices = [], [], [], [], [0], []
        for item in batch.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            table = seq.block_table
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
            context_lens.append(end)
            cu_seqlens.append(cu_seqlens[-1] + item.num_new_tokens)
            if item.samples:
                logits_indices.append(cu_seqlens[-1] - 1)
        return StepInputs(
            input_ids=self._tensor([input_ids], torch.long),
            position_ids=self._tensor([positions], torch.long),
            logits_indices=self._tensor(logits_indices, torch.long),
            metadata=self._metadata(batch, slots, context_lens, cu_seqlens))

    def _metadata(self, batch, slots, context_lens, cu_seqlens) -> attention.AttentionMetadata:
        width = max(len(item.seq.block_table) for item in batch.scheduled)
        tables = [item.seq.block_table + [0] * (width - len(item.seq.block_table)) for item in batch.scheduled]
        meta = attention.AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.long),
            block_tables=self._tensor(tables, torch.int32),
            context_lens=self._tensor(context_lens, torch.int32),
            cu_seqlens_q=cu_seqlens,
            context_lens_host=context_lens,
            num_decodes=sum(1 for item in batch.scheduled if item.num_new_tokens == 1),
            kv_caches=self.kv_caches,
            backend=self.backend)
        return meta

    def _tensor(self, data, dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    logits_indices: torch.Tensor  # [num sampling sequences]
    metadata: attention.AttentionMetadata

    def to_broadcast(self) -> tuple[list[torch.Tensor], list[int]]:
        """The step as tensors for the other ranks of a group, and the header giving their shapes."""
        meta = self.metadata
        cu_seqlens = torch.tensor(meta.cu_seqlens_q, dtype=torch.long)
        tensors = [self.input_ids, self.position_ids, self.logits_indices, meta.slot_mapping,
                   meta.block_tables, meta.context_lens, cu_seqlens]
        header = [self.input_ids.shape[1], meta.block_tables.shape[0], meta.block_tables.shape[1],
                  self.logits_indices.shape[0], meta.num_decodes]
        return tensors, header

    @classmethod
    def receive(cls, group, header: list[int], runner: "ModelRunner") -> "StepInputs":
        """The step rank 0 broadcast (``to_broadcast``), on another rank of the group."""
        num_tokens, num_seqs, max_blocks, num_logits, num_decodes = header
        device = runner.device

        def receive(shape, dtype):
            return group.broadcast(torch.empty(shape, dtype=dtype, device=device))

        input_ids, position_ids = receive((1, num_tokens), torch.long), receive((1, num_tokens), torch.long)
        logits_indices, slot_mapping = receive((num_logits,), torch.long), receive((num_tokens,), torch.long)
        block_tables, context_lens = receive((num_seqs, max_blocks), torch.int32), receive((num_seqs,), torch.int32)
        cu_seqlens = receive((num_seqs + 1,), torch.long).tolist()
        meta = attention.AttentionMetadata(
            slot_mapping=slot_mapping, block_tables=block_tables, context_lens=context_lens,
            cu_seqlens_q=cu_seqlens, context_lens_host=context_lens.tolist(), num_decodes=num_decodes,
            kv_caches=runner.kv_caches, backend=runner.backend)
        return cls(input_ids, position_ids, logits_indices, meta)

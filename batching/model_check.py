"""Load-time proof that the engine serves a model exactly, or a refusal that says why.

Two probe forwards run when a model loads, before anything is served:

1. Discovery (``discover_layers``): one forward over a few probe tokens with the project's
   attention function in discovery mode. It records every attention layer's KV heads, head size
   and parameters as the modules really compute them (a config may carry attributes its model
   ignores), and refuses anything the attention function cannot honour.
2. Verification (``verify``): the probe tokens of two sequences go through the real serving path
   (block-table cache with shuffled blocks, two prefills packed together, a prefill chunk over
   cached context next to a decode, then batched decodes), and the logits of every position must
   match the model's own eager forward of each whole sequence. A layer that keeps state outside
   the KV cache, or computes attention in its own code, cannot pass: its incremental output
   differs from the full forward.

A model that fails is refused with ``UnsupportedModelError`` (a ``ConfigError``: ``serve`` exits
naming the model type, what is unsupported and what is served instead); ``/ping`` is never
healthy for it.
"""

from __future__ import annotations

import logging

import torch

from batching.scheduler import ScheduledSequence, SchedulerOutput
from batching.sequence import Sequence
from djl_like.errors import ConfigError
from djl_like.protocol import GenerationParams
from kernels import attention
from kernels.attention import LayerDiscovery, LayerSpec, UnsupportedAttention

logger = logging.getLogger(__name__)

# The architectures the compatibility matrix (tests/batching/test_model_matrix.py) serves exactly.
SERVED_EXACTLY = "Llama, Mistral, Mixtral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3, GPT-2, gpt-oss"
# Largest relative logit error (max |ours - eager| / max |eager|) the probe accepts per dtype:
# summation order alone (measured: 4e-6 in fp32 and 0.026 in bf16 on SmolLM2-135M), far below the
# 0.5 and more that a layer computing attention outside the engine produces.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.1}
PROBE_LENGTHS = (14, 11)
PROBE_BLOCK_SIZE = 4


class UnsupportedModelError(ConfigError):
    """The model cannot be served exactly by this engine."""


def refuse(model, problem: str) -> UnsupportedModelError:
    return _refusal(model.config, type(model).__name__, problem)


def _refusal(config, class_name: str, problem: str) -> UnsupportedModelError:
    model_type = getattr(config, "model_type", None) or class_name
    return UnsupportedModelError(
        f"cannot serve model type {model_type!r} ({class_name}) exactly: {problem}. "
        f"Architectures served exactly: {SERVED_EXACTLY} (see README, Supported models)")


_NO_INTERFACE = ("its attention does not go through transformers' attention interface "
                 "(for example an ALiBi bias or a model-specific attention dispatch)")


def check_model_class(config) -> None:
    """Refuse before loading any weight a model class that cannot call a custom attention
    function (transformers may not even load it with one). Classes from remote code, unknown
    here, are left to the probes."""
    from transformers import AutoModelForCausalLM

    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):
        return
    if not getattr(model_class, "_supports_attention_backend", False):
        raise _refusal(config, model_class.__name__, _NO_INTERFACE)


def probe_tokens(model, length: int, seed: int) -> list[int]:
    vocab_size = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def check_tensor_parallel_plan(config, world_size: int) -> None:
    """Refuse tensor parallelism for a model type without a transformers tensor-parallel plan, or
    whose heads do not divide among the ranks."""
    model_type = getattr(config, "model_type", type(config).__name__)
    if not getattr(config, "base_model_tp_plan", None):
        raise UnsupportedModelError(
            f"option.tensor_parallel_degree={world_size}: model type {model_type!r} has no tensor-parallel plan "
            "in transformers, so it cannot be sharded; serve it with option.tensor_parallel_degree=1")
    text = config.get_text_config()
    heads = {"attention heads": getattr(text, "num_attention_heads", None),
             "KV heads": getattr(text, "num_key_value_heads", None)}
    for name, count in heads.items():
        if count and count % world_size:
            raise UnsupportedModelError(
                f"option.tensor_parallel_degree={world_size}: model type {model_type!r} has {count} {name}, "
                f"which do not divide among {world_size} ranks; pick a degree that divides {count}")


def discover_layers(model) -> list[LayerSpec]:
    """Every attention layer as the model computes it, ordered by ``layer_idx``."""
    if not getattr(model, "_supports_attention_backend", False):
        raise refuse(model, _NO_INTERFACE)
    tokens = probe_tokens(model, PROBE_LENGTHS[0], seed=0)
    discovery = LayerDiscovery()
    device = next(model.parameters()).device
    try:
        with attention.step_context(discovery), torch.inference_mode():
            model(input_ids=torch.tensor([tokens], device=device),
                  position_ids=torch.arange(len(tokens), device=device)[None], use_cache=False)
    except UnsupportedAttention as error:
        raise refuse(model, str(error)) from error
    except Exception as error:  # NOTE: any failure of the probe means the model cannot be served
        raise refuse(model, f"its forward fails under this engine's attention ({type(error).__name__}: {error})") from error
    if discovery.problems:
        raise refuse(model, "; ".join(discovery.problems))
    if not discovery.layers:
        raise refuse(model, "no layer computed attention through this engine's attention function, "
                            "so its KV cache would stay empty")
    indices = sorted(discovery.layers)
    if indices != list(range(len(indices))):
        raise refuse(model, f"its attention layers are numbered {indices}, not 0..{len(indices) - 1}")
    return [discovery.layers[i] for i in indices]


def static_rope_limit(model) -> int | None:
    """The longest context over which the model's rotary embedding does not depend on the batch.

    transformers' dynamic-NTK and LongRoPE embeddings recompute their frequencies from the
    largest position in the whole forward: in a packed batch one sequence's positions would then
    change another's. Below this limit the frequencies never change.
    """
    limits = []
    for module in model.modules():
        rope_type = getattr(module, "rope_type", None)
        kinds = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
        for kind in kinds:
            if not isinstance(kind, str):
                continue
            if "dynamic" in kind:
                limits.append(int(getattr(module, "original_max_seq_len")))
            elif kind == "longrope":
                limits.append(_original_max_positions(module.config))
    return min(limits) if limits else None


def _original_max_positions(config) -> int:
    params = getattr(config, "rope_parameters", None) or {}
    candidates = [params] + [value for value in params.values() if isinstance(value, dict)]
    for candidate in candidates:
        if "original_max_position_embeddings" in candidate:
            return int(candidate["original_max_position_embeddings"])
    return int(getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)


def verify(runner) -> None:
    """Run the probe sequences through the serving path and compare with the eager forward.
    Uses (and then releases) a small probe KV cache on the runner."""
    model = runner.model
    sequences = [Sequence(probe_tokens(model, length, seed=i + 1), GenerationParams(max_new_tokens=1))
                 for i, length in enumerate(PROBE_LENGTHS)]
    try:
        expected = [_eager_logits(model, seq.token_ids) for seq in sequences]
    except Exception as error:  # NOTE: without its reference the check cannot pass
        raise refuse(model, f"its eager forward, the reference of the load-time check, fails "
                            f"({type(error).__name__}: {error})") from error
    blocks_needed = [-(-seq.num_tokens // PROBE_BLOCK_SIZE) for seq in sequences]
    order = torch.randperm(sum(blocks_needed) + 2, generator=torch.Generator().manual_seed(0)).tolist()
    runner.allocate_local_kv_cache(len(order), PROBE_BLOCK_SIZE)
    try:
        for seq, count in zip(sequences, blocks_needed):
            seq.block_table, order = order[:count], order[count:]
        worst = max(_probe_step(runner, sequences, expected, chunks)
                    for chunks in _probe_schedule(sequences))
    finally:
        runner.release_kv_cache()
    tolerance = TOLERANCE.get(runner.dtype, TOLERANCE[torch.bfloat16])
    if not worst <= tolerance:
        raise refuse(model, f"its logits through this engine's KV cache differ from its own eager forward "
                            f"on a probe (relative error {worst:.3g} > {tolerance:g}): the engine does not compute "
                            "this model's attention as the model does (for example a layer keeps state "
                            "outside the KV cache, or computes attention in its own code)")
    logger.info("model check passed: %d attention layers, probe logits within %.2g of eager (relative)",
                runner.layout.num_layers, worst)


def _probe_schedule(sequences):
    """Chunks per step for the two probe sequences: both prefill; the first continues its prompt
    over cached context while the second decodes; then both decode to their ends."""
    first, second = sequences
    yield [(first, 6), (second, 5)]
    yield [(second, 1), (first, 5)]
    while first.num_uncomputed_tokens or second.num_uncomputed_tokens:
        yield [(seq, 1) for seq in sequences if seq.num_uncomputed_tokens]


def _probe_step(runner, sequences, expected, chunks) -> float:
    batch = SchedulerOutput([ScheduledSequence(seq, count) for seq, count in chunks])
    inputs = runner.prepare_step(batch)
    logits = runner.forward(inputs, torch.arange(inputs.input_ids.shape[1], device=runner.device))
    worst, row = 0.0, 0
    for seq, count in chunks:
        start = seq.num_computed_tokens
        reference = expected[sequences.index(seq)][start:start + count]
        error = (logits[row:row + count] - reference).abs().max() / reference.abs().max().clamp(min=1e-6)
        worst = max(worst, float(error)) if torch.isfinite(error) else float("inf")
        seq.num_computed_tokens += count
        row += count
    return worst


def _eager_logits(model, token_ids: list[int]) -> torch.Tensor:
    """The model's own forward of the whole sequence with transformers' eager attention."""
    device = next(model.parameters()).device
    current = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([token_ids], device=device), use_cache=False)
    finally:
        model.set_attn_implementation(current)
    return out.logits[0].float()

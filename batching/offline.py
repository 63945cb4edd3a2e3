"""Building an engine from a ServingConfig, and the offline ``generate()`` API."""

from __future__ import annotations

import logging

from batching.devices import copy_devices
from batching.engine import Engine
from batching.registry import batcher_class, is_contiguous
from batching.runner import ModelRunner
from batching.scheduler import SchedulerConfig
from djl_like.config import ALL_DEVICES, ServingConfig, Strategy
from djl_like.errors import ConfigError
from djl_like.protocol import GenerationParams, GenerationResult

logger = logging.getLogger(__name__)


def create_engine(config: ServingConfig, model_path: str, runner: ModelRunner | None = None) -> Engine:
    """Load the model (unless a runner is given), size the KV cache and build the batcher."""
    # NOTE: serve routes these two to their own apps (container.modes) before an engine is built.
    if config.entry_point:
        raise ConfigError(f"option.entryPoint={config.entry_point!r}: this is the text-generation engine; `serve` "
                          "calls custom handlers, which may build it with batching.handler_engine.HandlerEngine")
    if config.task not in (None, "text-generation"):
        raise ConfigError(f"option.task={config.task!r}: this is the text-generation engine; `serve` serves "
                          "text embedding with batching.embedding_engine")
    if runner is None:
        degree = tensor_parallel_degree(config)
        device, _ = copy_devices(config.device, degree)
        runner = ModelRunner(model_path, dtype=config.dtype, device=device, quantize=config.quantize,
                             trust_remote_code=config.trust_remote_code,
                             revision=config.revision, tensor_parallel_degree=degree)
    scheduler_config = size_kv_cache(config, runner)
    batcher = batcher_class(config.strategy.value)(scheduler_config)
    logger.info("strategy %s: %s", config.strategy.value, scheduler_config)
    return Engine(runner, batcher, job_queue_size=config.job_queue_size)


def tensor_parallel_degree(config: ServingConfig) -> int:
    """``option.tensor_parallel_degree``, with ``max`` resolved to the visible GPUs."""
    import torch

    degree = config.tensor_parallel_degree
    if degree == ALL_DEVICES:
        degree = torch.cuda.device_count() if config.device != "cpu" else 0
        if degree == 0:
            raise ConfigError("option.tensor_parallel_degree=max needs GPUs and none is visible; "
                              "give a number of ranks (on CPU each rank is a process over the same cores)")
    return degree


def size_kv_cache(config: ServingConfig, runner: ModelRunner) -> SchedulerConfig:
    """Turn the one capacity knob (tokens) into blocks for this strategy and allocate them."""
    max_model_len = resolve_max_model_len(config.max_model_len, runner)
    dynamic = config.strategy is Strategy.DYNAMIC
    max_num_seqs = config.batch_size if dynamic else config.max_rolling_batch_size
    capacity = runner.kv_capacity_tokens(config.max_kv_cache_tokens, config.gpu_memory_utilization,
                                         default_cpu=max_num_seqs * max_model_len)
    block_size = max_model_len if is_contiguous(config.strategy.value) else config.block_size
    num_blocks = capacity // block_size
    if num_blocks == 0:
        raise ConfigError(f"the KV cache capacity ({capacity} tokens) cannot hold one block of {block_size} tokens; "
                          "raise option.max_kv_cache_tokens or lower option.max_model_len")
    runner.allocate_kv_cache(num_blocks, block_size)
    return SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=config.max_rolling_batch_prefill_tokens,
        max_model_len=max_model_len,
        num_blocks=num_blocks,
        block_size=block_size,
        enable_prefix_caching=config.enable_prefix_caching,
        max_batch_delay_s=config.max_batch_delay_ms / 1000.0)


def resolve_max_model_len(requested: int | None, runner: ModelRunner) -> int:
    """``option.max_model_len``, or the longest length the model serves exactly when unset."""
    limit = runner.max_position_embeddings
    if requested is not None and requested > limit:
        raise ConfigError(f"option.max_model_len={requested} exceeds the model's max_position_embeddings ({limit})")
    rope_limit = runner.rope_limit
    if rope_limit is None or rope_limit >= (requested or limit):
        return requested or limit
    why = (f"beyond {rope_limit} tokens this model's rotary embedding (dynamic NTK or LongRoPE) is recomputed "
           "from the longest sequence of a batch, so one request's output would depend on the others")
    if requested is not None:
        raise ConfigError(f"option.max_model_len={requested}: {why}; set option.max_model_len <= {rope_limit}")
    logger.warning("serving at most %d tokens per sequence (option.max_model_len): %s", rope_limit, why)
    return rope_limit


def generate(engine: Engine, prompts: list[str] | list[list[int]],
             params: GenerationParams | list[GenerationParams]) -> list[GenerationResult]:
    """Generate for every prompt through the engine's batcher; results in prompt order."""
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    handles = [engine.submit(prompt, p) for prompt, p in zip(prompts, per_prompt)]
    if not engine.is_running:
        engine.run_until_idle()
    return [handle.result() for handle in handles]

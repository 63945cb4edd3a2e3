"""Shared pieces of the engine tests: building an engine on a tiny model at a chosen KV size,
and the Hugging Face ``generate`` reference outputs."""

from __future__ import annotations

from functools import lru_cache

import torch

from batching.engine import Engine
from batching.offline import create_engine
from batching.runner import ModelRunner
from djl_like.config import ServingConfig, Strategy

_RUNNERS: dict[str, ModelRunner] = {}


def make_engine(model_path, strategy: str, **settings) -> Engine:
    """An engine over a cached runner (the model loads once per test session; the KV cache is
    reallocated for every engine)."""
    runner = _RUNNERS.get(str(model_path))
    if runner is None:
        runner = _RUNNERS[str(model_path)] = ModelRunner(str(model_path), dtype="fp32", device="cpu")
    config = ServingConfig(strategy=Strategy(strategy), **settings)
    return create_engine(config, str(model_path), runner=runner)


@lru_cache(maxsize=None)
def _reference_model(model_path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def reference_tokens(model_path, prompt_ids: tuple[int, ...], max_new_tokens: int, **kwargs) -> list[int]:
    """Greedy ``model.generate`` continuation of ``prompt_ids`` (EOS included when produced)."""
    return list(_reference_cached(str(model_path), tuple(prompt_ids), max_new_tokens, tuple(sorted(kwargs.items()))))


@lru_cache(maxsize=None)
def _reference_cached(model_path: str, prompt_ids, max_new_tokens: int, kwargs) -> tuple[int, ...]:
    model = _reference_model(model_path)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long), **dict(kwargs))
    return tuple(out[0, len(prompt_ids):].tolist())

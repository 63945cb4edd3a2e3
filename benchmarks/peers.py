"""Offline peers: the same prompts and model run in-process by Hugging Face transformers, with no
HTTP, to place the server's figures against what a user would get without it.

- ``hf-continuous-batching``: transformers' own continuous batching (the manager behind
  ``model.generate_batch``; the manager API is used because it takes a ``max_new_tokens`` per
  request, as the workloads need), ``sdpa`` attention, an explicit paged cache of the same
  capacity as the server's KV cache.
- ``hf-generate-loop``: one ``model.generate`` call per request, one after another.

Both are greedy with EOS disabled (``min_new_tokens == max_new_tokens``), so every request
produces exactly its ``max_new_tokens``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from benchmarks.workloads import RequestSpec

PEERS = ("hf-continuous-batching", "hf-generate-loop")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "auto": "float32"}


@dataclass
class PeerModel:
    """A model and tokenizer loaded for the offline peers."""

    model: object
    tokenizer: object

    @classmethod
    def load(cls, model_path: str, dtype: str = "fp32") -> "PeerModel":
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # keeps benchmark output (and the notebook) readable
        try:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, DTYPES[dtype]),
                                                         attn_implementation="sdpa").eval()
        finally:
            transformers_logging.enable_progress_bar()
        return cls(model, AutoTokenizer.from_pretrained(model_path))

    def encode(self, specs: Sequence[RequestSpec]) -> list[list[int]]:
        # The server tokenizes the same way (the tokenizer's own special-token policy).
        return [self.tokenizer.encode(spec.prompt) for spec in specs]


def run_continuous_batching(peer: PeerModel, specs: Sequence[RequestSpec], *, kv_capacity_tokens: int,
                            max_batch_tokens: int = 512, page_size: int = 32,
                            max_requests_per_batch: int | None = None) -> list[int]:
    """All requests through transformers' continuous batching; returns output lengths in order."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    inputs = peer.encode(specs)
    cache = ContinuousBatchingConfig(num_blocks=max(1, kv_capacity_tokens // page_size), page_size=page_size,
                                     max_batch_tokens=max_batch_tokens,
                                     max_requests_per_batch=max_requests_per_batch)
    config = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=max(s.max_new_tokens for s in specs))
    lengths: dict[str, int] = {}
    with peer.model.continuous_batching_context_manager(generation_config=config, continuous_batching_config=cache,
                                                        block=True, timeout=30, warmup=False) as manager:
        ids = [manager.add_request(ids, request_id=f"r{i}", max_new_tokens=spec.max_new_tokens, eos_token_id=-1)
               for i, (ids, spec) in enumerate(zip(inputs, specs))]
        while len(lengths) < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                lengths[result.request_id] = len(result.generated_tokens)
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching stopped before finishing every request")
    return [lengths[request_id] for request_id in ids]


def run_generate_loop(peer: PeerModel, specs: Sequence[RequestSpec]) -> list[int]:
    """One ``generate`` per request; returns output lengths in order."""
    import torch

    lengths = []
    for ids, spec in zip(peer.encode(specs), specs):
        new = spec.max_new_tokens
        input_ids = torch.tensor([ids])
        with torch.inference_mode():
            output = peer.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                         max_new_tokens=new, min_new_tokens=new,
                                         pad_token_id=peer.tokenizer.pad_token_id or 0)
        lengths.append(output.shape[1] - input_ids.shape[1])
    return lengths


def timed(run: Callable[[], list[int]], specs: Sequence[RequestSpec], prompt_tokens: int) -> dict:
    """Metrics of an offline run in the load generator's shape (no per-token latencies offline)."""
    start = time.perf_counter()
    lengths = run()
    duration = time.perf_counter() - start
    output_tokens = sum(lengths)
    return {
        "num_requests": len(specs),
        "completed": len(lengths),
        "failed": 0,
        "duration_s": duration,
        "request_throughput": len(lengths) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (output_tokens + prompt_tokens) / duration,
        "total_output_tokens": output_tokens,
        "total_prompt_tokens": prompt_tokens,
        "wrong_output_length": sum(1 for n, s in zip(lengths, specs) if n != s.max_new_tokens),
        "errors_by_status": {},
        "failures": [],
    }


def run_peer(name: str, peer: PeerModel, specs: Sequence[RequestSpec], *, kv_capacity_tokens: int,
             max_batch_tokens: int = 512, max_requests_per_batch: int | None = None) -> dict:
    """One offline peer over ``specs`` (after a short warm-up); the metrics dict."""
    prompt_tokens = sum(len(ids) for ids in peer.encode(specs))
    if name == "hf-continuous-batching":
        def run():
            return run_continuous_batching(peer, specs, kv_capacity_tokens=kv_capacity_tokens,
                                           max_batch_tokens=max_batch_tokens,
                                           max_requests_per_batch=max_requests_per_batch)
    elif name == "hf-generate-loop":
        def run():
            return run_generate_loop(peer, specs)
    else:
        raise ValueError(f"unknown peer {name!r}; choose from: {', '.join(PEERS)}")
    run_generate_loop(peer, [RequestSpec(specs[0].prompt, 2)])  # warm-up: first-call overheads
    return timed(run, specs, prompt_tokens)

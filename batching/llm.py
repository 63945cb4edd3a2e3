"""The offline Python API, in the shape users know from vLLM: no server, no HTTP.

    from batching import LLM

    llm = LLM("path/to/model", rolling_batch="auto", max_rolling_batch_size=16)
    outputs = llm.generate(["Hello, my name is", "The capital of France is"], {"max_new_tokens": 32})
    print(outputs[0].text, outputs[0].finish_reason)

Keyword arguments are serving.properties keys (the ``option.`` prefix may be left out; the
server-level keys such as ``batch_size`` have none), so the strategy is chosen exactly as
``serve`` chooses it. Parameters are LMI's (``max_new_tokens``, ``temperature``, ``top_p``,
``stop_sequences`` ...), validated as ``/invocations`` validates them, or a ``GenerationParams``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from batching.offline import create_engine
from djl_like.config import ServingConfig
from djl_like.protocol import GenerationParams, GenerationResult
from djl_like.requests import parse_invocation

# serving.properties keys without the option. prefix.
SERVER_LEVEL_KEYS = frozenset({"engine", "batch_size", "max_batch_delay", "job_queue_size", "minWorkers",
                               "maxWorkers", "port", "max_payload_mb"})


@dataclass(frozen=True)
class GenerationOutput:
    """One prompt's generation: the text, its token ids, the model's log-probability of each
    token (raw logits, before penalties, temperature and filters), and why it stopped."""

    prompt: str | list[int]
    text: str
    token_ids: list[int]
    log_probs: list[float]
    finish_reason: str | None
    num_prompt_tokens: int

    @classmethod
    def from_result(cls, prompt, result: GenerationResult, num_prompt_tokens: int) -> "GenerationOutput":
        reason = result.finish_reason
        return cls(prompt, result.text, [t.token_id for t in result.tokens], [t.log_prob for t in result.tokens],
                   reason.value if reason is not None else None, num_prompt_tokens)


class LLM:
    """A model loaded once with its batcher and engine thread; ``generate`` as often as needed,
    ``close()`` (or a ``with`` block) to stop the engine thread."""

    def __init__(self, model: str, properties: Mapping[str, Any] | None = None, **options: Any):
        props = {key: _property_value(value) for key, value in (properties or {}).items()}
        props.update({_property_key(name): _property_value(value) for name, value in options.items()})
        self.config = ServingConfig.from_properties(props, model_dir=model)
        self.engine = create_engine(self.config, self.config.model_id or model).start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | Sequence[str] | Sequence[list[int]],
                 parameters: GenerationParams | Mapping[str, Any] | Sequence | None = None,
                 *, use_tqdm: bool = True) -> list[GenerationOutput]:
        """Generate for every prompt (text, or token ids) through the configured batcher; results
        in prompt order. ``parameters``: one for all prompts, or a list with one per prompt.
        Raises the first request's ``LmiError`` (bad parameters, prompt too long ...)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        per_prompt = list(parameters) if isinstance(parameters, (list, tuple)) else [parameters] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} parameter sets for {len(prompts)} prompts")
        params = [self._params(p) for p in per_prompt]
        handles = []
        try:
            for prompt, p in zip(prompts, params):
                handles.append(self.engine.submit(prompt, p))
            return [GenerationOutput.from_result(prompt, handle.result(), handle.num_prompt_tokens)
                    for prompt, handle in zip(prompts, _progress(handles, use_tqdm))]
        finally:
            for handle in handles:
                handle.abort()  # a no-op for finished requests; frees the rest after an error

    def _params(self, parameters) -> GenerationParams:
        if parameters is None:
            parameters = {}
        if isinstance(parameters, GenerationParams):
            return parameters
        body = json.dumps({"inputs": "-", "parameters": dict(parameters)}).encode()
        return parse_invocation(body, max_model_len=self.engine.batcher.config.max_model_len).params

    def close(self) -> None:
        """Stop the engine thread and, under tensor parallelism, the other ranks."""
        self.engine.shutdown()
        self.engine.runner.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _property_key(name: str) -> str:
    return name if name in SERVER_LEVEL_KEYS or name.startswith("option.") else f"option.{name}"


def _property_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _progress(handles: list, enabled: bool):
    if not enabled:
        return handles
    from tqdm import tqdm

    return tqdm(handles, desc="generate", unit="prompt")

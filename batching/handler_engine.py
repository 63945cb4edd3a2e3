"""The project's engine for custom handlers: pre- and post-processing around the built-in text
generation, with the batching strategy of serving.properties (rolling, paged or dynamic).

    from djl_python import Input, Output
    from batching.handler_engine import HandlerEngine

    engine = None

    def handle(inputs: Input):
        global engine
        if inputs.is_empty():  # the init call carries the properties
            engine = HandlerEngine(inputs.get_properties())
            return None
        body = inputs.get_as_json()
        text = engine.generate(body["prompt"], {"max_new_tokens": 64})
        return Output().add_as_json({"answer": text.strip()})

With ``option.rolling_batch=auto`` (or another rolling value) in serving.properties the server
calls ``handle`` concurrently, so requests share the engine's iteration-level batches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from batching.llm import LLM
from djl_like.protocol import GenerationParams
from djl_like.requests import parse_invocation

# Init-call properties that describe the handler or the device, not the engine.
_NOT_ENGINE_KEYS = frozenset({"model_dir", "model_id", "device_id", "entryPoint", "handler", "install_requirements"})


class HandlerEngine:
    """A text-generation engine built from a handler's init properties (``model_dir`` and the
    serving.properties keys without ``option.``) and started at once; thread-safe."""

    def __init__(self, properties: Mapping[str, str]):
        model = properties.get("model_id") or properties["model_dir"]
        options = {key: value for key, value in properties.items() if key not in _NOT_ENGINE_KEYS}
        self.llm = LLM(model, **options)

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    def generate(self, prompt: str, parameters: Mapping[str, Any] | None = None) -> str:
        """The generated text of ``prompt``; ``parameters`` are LMI's (``max_new_tokens`` ...).
        Raises ``BadRequestError`` (400) for invalid parameters or a prompt that cannot fit."""
        return self.llm.generate([prompt], dict(parameters or {}), use_tqdm=False)[0].text

    def stream(self, prompt: str, parameters: Mapping[str, Any] | None = None) -> Iterator[str]:
        """The generated text of ``prompt`` piece by piece, as the engine produces it (for
        ``Output.add_stream_content``). Submitted at once; a stream left unread is aborted."""
        handle = self.llm.engine.submit(prompt, self._params(parameters))
        return _pieces(handle)

    def stats(self) -> dict:
        return self.llm.engine.stats()

    def close(self) -> None:
        self.llm.close()

    def _params(self, parameters: Mapping[str, Any] | None) -> GenerationParams:
        body = json.dumps({"inputs": "-", "parameters": dict(parameters or {})}).encode()
        return parse_invocation(body, max_model_len=self.llm.engine.batcher.config.max_model_len).params


def _pieces(handle) -> Iterator[str]:
    try:
        for token in handle:
            if token.text:
                yield token.text
    finally:
        handle.abort()  # a no-op once finished; frees the sequence of a stream closed early

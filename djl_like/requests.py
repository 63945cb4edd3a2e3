"""Parse and validate ``/invocations`` bodies into typed requests.

Two body shapes are accepted: LMI text generation (``inputs`` + ``parameters``), parsed here into
an ``InvocationRequest``, and OpenAI chat (``messages`` + top-level OpenAI parameters), parsed by
``djl_like.openai_requests`` with the stream rule of ``option.output_formatter``. Every problem
with the body raises ``BadRequestError`` naming the offending field, before anything reaches the
engine. Unknown parameters are not errors: they are returned in ``unknown_parameters`` for the
route to warn about, because users carry parameters meant for other engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from djl_like.errors import BadRequestError, PayloadTooLargeError
from djl_like.fields import (MAX_STOP_SEQUENCE_CHARS, MAX_STOP_SEQUENCES, PARAMETER_VALIDATORS, boolean,
                             generation_params, load_json_object, shown, validate_parameters)
from djl_like.openai_requests import OpenAIRequest, parse_chat_payload
from djl_like.protocol import GenerationParams

__all__ = ["MAX_STOP_SEQUENCES", "MAX_STOP_SEQUENCE_CHARS", "STREAM_FORMATTERS", "InvocationRequest",
           "check_body_size", "parse_invocation", "select_stream"]

STREAM_FORMATTERS = ("jsonlines", "sse")
# NOTE: the name djl_like.embedding_requests imports.
_load_json_object = load_json_object


@dataclass(frozen=True)
class InvocationRequest:
    """One validated LMI ``/invocations`` request, ready for the route to submit.

    ``prompts`` holds the LMI ``inputs`` (one entry per prompt). ``is_batch`` is true when
    ``inputs`` was a list, so the response must be a list too. ``output_formatter`` is ``json``
    for a whole response, ``jsonlines`` or ``sse`` for a stream.
    """

    prompts: tuple[str, ...]
    is_batch: bool
    params: GenerationParams
    stream: bool
    output_formatter: str
    unknown_parameters: tuple[str, ...] = ()

    @property
    def is_chat(self) -> bool:
        return False


def check_body_size(num_bytes: int, limit: int) -> None:
    """Raise ``PayloadTooLargeError`` (413) when a body of ``num_bytes`` exceeds ``limit``."""
    if num_bytes > limit:
        raise PayloadTooLargeError(
            f"request body is {num_bytes} bytes, over the limit of {limit} bytes"
        )


def parse_invocation(
    body: bytes, *, default_output_formatter: str = "json", max_model_len: int | None = None
) -> InvocationRequest | OpenAIRequest:
    """Parse an ``/invocations`` body; raise ``BadRequestError`` naming the field on bad input.

    ``default_output_formatter`` is ``option.output_formatter``; ``max_model_len`` bounds an
    explicit ``max_new_tokens`` (prompt length is checked later, once it is tokenized). A body
    with ``messages`` is OpenAI chat (an ``OpenAIRequest``).
    """
    payload = load_json_object(body)
    if "messages" in payload:
        return parse_chat_payload(payload, max_model_len=max_model_len,
                                  stream_rule=lambda explicit: select_stream(explicit, False, default_output_formatter))
    return _parse_generation(payload, default_output_formatter, max_model_len)


def select_stream(
    explicit: list[bool], is_batch: bool, default_output_formatter: str
) -> tuple[bool, str]:
    """Return (stream, output_formatter) from explicit ``stream`` flags and the server default.

    NOTE: as in LMI, ``option.output_formatter=jsonlines|sse`` streams a request that does not
    say ``stream``; a list of prompts that does not ask to stream still gets one JSON list.
    """
    stream_default = default_output_formatter in STREAM_FORMATTERS
    stream = any(explicit) if explicit else stream_default and not is_batch
    if stream and is_batch:
        raise BadRequestError("stream: a list of inputs cannot be streamed; send one prompt")
    if not stream:
        return False, "json"
    return True, default_output_formatter if stream_default else "jsonlines"


# --- LMI text generation -------------------------------------------------------------------

_GENERATION_TOP_LEVEL = ("inputs", "parameters", "stream")


def _parse_generation(
    payload: dict, default_output_formatter: str, max_model_len: int | None
) -> InvocationRequest:
    prompts, is_batch = _prompts(payload.get("inputs"))
    values, unknown = validate_parameters(
        _parameters_object(payload), PARAMETER_VALIDATORS, "parameters."
    )
    explicit = _explicit_streams(payload.get("stream"), values.get("stream"))
    stream, output_formatter = select_stream(explicit, is_batch, default_output_formatter)
    unknown_top_level = tuple(k for k in payload if k not in _GENERATION_TOP_LEVEL)
    return InvocationRequest(
        prompts=prompts,
        is_batch=is_batch,
        params=generation_params(values, "parameters.", max_model_len),
        stream=stream,
        output_formatter=output_formatter,
        unknown_parameters=unknown_top_level + unknown,
    )


def _prompts(inputs: Any) -> tuple[tuple[str, ...], bool]:
    """Return (prompts, is_batch) from the ``inputs`` field."""
    if inputs is None:
        raise BadRequestError("inputs is missing: send 'inputs' (or 'messages' for chat)")
    if isinstance(inputs, str):
        if not inputs:
            raise BadRequestError("inputs must not be an empty string")
        return (inputs,), False
    if not isinstance(inputs, list) or not inputs:
        raise BadRequestError(
            f"inputs must be a string or a non-empty list of strings, got {shown(inputs)}"
        )
    for index, prompt in enumerate(inputs):
        if not isinstance(prompt, str) or not prompt:
            raise BadRequestError(f"inputs[{index}] must be a non-empty string")
    return tuple(inputs), True


def _parameters_object(payload: dict) -> dict:
    parameters = payload.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise BadRequestError(f"parameters must be a JSON object, got {shown(parameters)}")
    return parameters


def _explicit_streams(top_level: Any, in_parameters: bool | None) -> list[bool]:
    flags = [] if top_level is None else [boolean("stream", top_level)]
    return flags if in_parameters is None else flags + [in_parameters]

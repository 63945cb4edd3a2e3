"""Output formats of ``/invocations``: LMI JSON, jsonlines and SSE streams (OpenAI shapes are in
``djl_like.openai_formatters``).

Pure functions from typed results (``GenerationResult``, ``TokenOutput``) to JSON-ready dicts and
framed bytes; the route does the I/O.
"""

from __future__ import annotations

import json
import math

from djl_like.errors import LmiError
from djl_like.protocol import GenerationParams, GenerationResult, TokenOutput
from djl_like.requests import InvocationRequest

_CONTENT_TYPES = {
    "json": "application/json",
    # NOTE: frames carry raw UTF-8; without the charset, HTTP clients decode text/* as latin-1.
    "jsonlines": "application/jsonlines; charset=utf-8",
    "sse": "text/event-stream; charset=utf-8",
}


# --- LMI text generation -------------------------------------------------------------------


def format_generation(
    prompt: str,
    result: GenerationResult,
    params: GenerationParams,
    num_prompt_tokens: int | None = None,
) -> dict:
    """The LMI response object of one prompt: ``generated_text`` and, with details, ``details``.

    ``details.prompt_tokens`` is added when the prompt length is known (from the argument or
    from the last token output).
    """
    output: dict = {"generated_text": _visible_text(prompt, result.text, params)}
    if params.details:
        details = _details(prompt, result, num_prompt_tokens)
        details["tokens"] = [_token_dict(token) for token in result.tokens]
        output["details"] = details
    return output


def format_response(request: InvocationRequest, results: list[GenerationResult]) -> dict | list:
    """The whole non-streaming LMI response: a dict for one prompt, a list for a batch.

    ``results[i]`` must be the result of ``request.prompts[i]``.
    """
    if len(results) != len(request.prompts):
        raise ValueError(f"{len(results)} results for {len(request.prompts)} prompts")
    outputs = [
        format_generation(prompt, result, request.params)
        for prompt, result in zip(request.prompts, results)
    ]
    return outputs if request.is_batch else outputs[0]


def stream_chunk(
    token: TokenOutput, *, result_so_far: GenerationResult, params: GenerationParams
) -> dict:
    """One line of an LMI stream: ``{"token": ...}``; the last line adds the full text and details.

    ``result_so_far`` must already include ``token`` as its last element.
    """
    chunk: dict = {"token": _token_dict(token)}
    if token.finish_reason is not None:
        prompt = result_so_far.prompt
        chunk["generated_text"] = _visible_text(prompt, result_so_far.text, params)
        if params.details:
            chunk["details"] = _details(prompt, result_so_far, token.num_prompt_tokens)
    return chunk


def _visible_text(prompt: str, generated: str, params: GenerationParams) -> str:
    return prompt + generated if params.return_full_text else generated


def _details(prompt: str, result: GenerationResult, num_prompt_tokens: int | None) -> dict:
    finish_reason = result.finish_reason
    details = {
        "finish_reason": finish_reason.value if finish_reason is not None else None,
        "generated_tokens": len(result.tokens),
        "inputs": prompt,
    }
    if num_prompt_tokens is None and result.tokens:
        num_prompt_tokens = result.tokens[-1].num_prompt_tokens
    if num_prompt_tokens is not None:
        details["prompt_tokens"] = num_prompt_tokens
    return details


def _token_dict(token: TokenOutput) -> dict:
    return {"id": token.token_id, "text": token.text, "log_prob": _json_float(token.log_prob)}


def _json_float(value: float) -> float | None:
    # NOTE: json.dumps writes -Infinity/NaN, which strict JSON parsers reject; null is valid.
    return value if math.isfinite(value) else None


# --- framing -------------------------------------------------------------------------------


def content_type(output_formatter: str) -> str:
    """The HTTP Content-Type of an output formatter (``json``, ``jsonlines`` or ``sse``)."""
    try:
        return _CONTENT_TYPES[output_formatter]
    except KeyError:
        raise ValueError(f"unknown output formatter {output_formatter!r}") from None


def frame(obj: dict, output_formatter: str) -> bytes:
    """One stream frame: ``json + "\\n"`` for jsonlines, ``"data: " + json + "\\n\\n"`` for sse."""
    line = json.dumps(obj, ensure_ascii=False)
    if output_formatter == "jsonlines":
        return (line + "\n").encode("utf-8")
    if output_formatter == "sse":
        return ("data: " + line + "\n\n").encode("utf-8")
    raise ValueError(f"output formatter {output_formatter!r} does not stream")


def error_body(err: LmiError) -> dict:
    """The JSON body of an error response: ``{"code", "type", "message"}``."""
    return err.to_dict()

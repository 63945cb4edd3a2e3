"""Output formats of ``/invocations``: LMI JSON, jsonlines and SSE streams, OpenAI chat shapes.

Pure functions from typed results (``GenerationResult``, ``TokenOutput``) to JSON-ready dicts and
framed bytes; the route does the I/O.
"""

from __future__ import annotations

import json
import math

from djl_like.errors import LmiError
from djl_like.protocol import FinishReason, GenerationParams, GenerationResult, TokenOutput
from djl_like.requests import InvocationRequest

_CONTENT_TYPES = {
    "json": "application/json",
    # NOTE: frames carry raw UTF-8; without the charset, HTTP clients decode text/* as latin-1.
    "jsonlines": "application/jsonlines; charset=utf-8",
    "sse": "text/event-stream; charset=utf-8",
}
_OPENAI_FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.ABORT: "abort",
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
    if request.is_chat:
        raise ValueError("chat requests are answered with format_chat_completion")
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


def chat_stream_end(output_formatter: str) -> bytes:
    """What closes a chat stream: OpenAI's ``data: [DONE]`` under sse, nothing under jsonlines."""
    if output_formatter == "sse":
        return b"data: [DONE]\n\n"
    if output_formatter == "jsonlines":
        return b""
    raise ValueError(f"output formatter {output_formatter!r} does not stream")


def error_body(err: LmiError) -> dict:
    """The JSON body of an error response: ``{"code", "type", "message"}``."""
    return err.to_dict()


# --- OpenAI chat ---------------------------------------------------------------------------


def format_chat_completion(
    result: GenerationResult,
    *,
    model: str,
    request_id: str,
    created: int,
    num_prompt_tokens: int,
    logprobs: bool = False,
) -> dict:
    """The OpenAI ``chat.completion`` object of a finished chat generation.

    ``logprobs`` (the request's ``logprobs``, i.e. ``params.details``) adds per-token log
    probabilities in OpenAI's ``choices[0].logprobs.content`` shape.
    """
    num_completion_tokens = len(result.tokens)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": result.text},
        "logprobs": _openai_logprobs(result.tokens) if logprobs else None,
        "finish_reason": openai_finish_reason(result.finish_reason),
    }
    return {
        **_chat_header("chat.completion", model, request_id, created),
        "choices": [choice],
        "usage": {
            "prompt_tokens": num_prompt_tokens,
            "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens,
        },
    }


def chat_completion_chunk(
    token: TokenOutput,
    *,
    model: str,
    request_id: str,
    created: int,
    first: bool,
    logprobs: bool = False,
) -> dict:
    """One OpenAI ``chat.completion.chunk``: the token's text as ``delta.content``.

    The first chunk's delta also carries ``role: assistant``; the last one (the token with a
    ``finish_reason``) carries the OpenAI finish reason, the others ``null``.
    """
    delta = {"role": "assistant", "content": token.text} if first else {"content": token.text}
    choice = {
        "index": 0,
        "delta": delta,
        "logprobs": _openai_logprobs([token]) if logprobs else None,
        "finish_reason": openai_finish_reason(token.finish_reason),
    }
    header = _chat_header("chat.completion.chunk", model, request_id, created)
    return {**header, "choices": [choice]}


def openai_finish_reason(reason: FinishReason | None) -> str | None:
    """OpenAI's name for a finish reason: ``length`` stays, EOS and stop sequences are ``stop``."""
    return None if reason is None else _OPENAI_FINISH_REASONS[reason]


def _chat_header(object_name: str, model: str, request_id: str, created: int) -> dict:
    return {"id": request_id, "object": object_name, "created": created, "model": model}


def _openai_logprobs(tokens: list[TokenOutput]) -> dict:
    return {
        "content": [
            {
                "token": token.text,
                "logprob": _json_float(token.log_prob),
                "bytes": list(token.text.encode("utf-8")),
                "top_logprobs": [],
            }
            for token in tokens
        ]
    }

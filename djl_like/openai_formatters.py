"""OpenAI response shapes: chat completions and their chunks, legacy completions and their
chunks, usage, log-probabilities, the model list and the error object.

Pure functions from typed results (``GenerationResult``, ``TokenOutput``) to JSON-ready dicts; the
route does the I/O and keeps the per-choice state of a stream (first chunk, text offset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from djl_like.errors import LmiError
from djl_like.protocol import FinishReason, GenerationResult, TokenLogProb, TokenOutput

_FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.ABORT: "abort",
}
# OpenAI's error types by HTTP status; the SDK raises by status and shows message and type.
_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
                413: "invalid_request_error", 424: "model_error", 499: "client_closed_request",
                503: "service_unavailable_error", 504: "timeout_error", 507: "out_of_memory_error"}
OWNED_BY = "lmi-batching"


@dataclass(frozen=True)
class ResponseHeader:
    """What every object and chunk of one response repeats."""

    request_id: str
    created: int
    model: str

    def fields(self, object_name: str) -> dict:
        return {"id": self.request_id, "object": object_name, "created": self.created, "model": self.model}


@dataclass(frozen=True)
class Usage:
    num_prompt_tokens: int
    num_completion_tokens: int

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": self.num_completion_tokens,
                "total_tokens": self.num_prompt_tokens + self.num_completion_tokens}


def finish_reason(reason: FinishReason | None) -> str | None:
    """OpenAI's name for a finish reason: ``length`` stays, EOS and stop sequences are ``stop``."""
    return None if reason is None else _FINISH_REASONS.get(reason, reason.value)


def stream_end(output_formatter: str) -> bytes:
    """What closes an OpenAI stream: ``data: [DONE]`` under sse, nothing under jsonlines."""
    if output_formatter == "sse":
        return b"data: [DONE]\n\n"
    if output_formatter == "jsonlines":
        return b""
    raise ValueError(f"output formatter {output_formatter!r} does not stream")


def usage_chunk(header: ResponseHeader, object_name: str, usage: Usage) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {**header.fields(object_name), "choices": [], "usage": usage.to_dict()}


# --- chat ---------------------------------------------------------------------------------


def chat_completion(results: list[GenerationResult], *, header: ResponseHeader, usage: Usage,
                    logprobs: bool) -> dict:
    """The ``chat.completion`` object; ``results[i]`` is choice i."""
    choices = [{
        "index": index,
        "message": {"role": "assistant", "content": result.text},
        "logprobs": chat_logprobs(result.tokens) if logprobs else None,
        "finish_reason": finish_reason(result.finish_reason),
    } for index, result in enumerate(results)]
    return {**header.fields("chat.completion"), "choices": choices, "usage": usage.to_dict()}


def chat_chunk(token: TokenOutput, *, header: ResponseHeader, index: int, first: bool, logprobs: bool,
               with_usage: bool = False) -> dict:
    """One ``chat.completion.chunk`` of choice ``index``: the token's text as ``delta.content``.
    The choice's first chunk also carries ``role``; its last one the finish reason.
    ``with_usage``: the request asked for a usage chunk, so every other chunk says ``usage: null``."""
    delta = {"role": "assistant", "content": token.text} if first else {"content": token.text}
    choice = {"index": index, "delta": delta, "logprobs": chat_logprobs([token]) if logprobs else None,
              "finish_reason": finish_reason(token.finish_reason)}
    chunk = {**header.fields("chat.completion.chunk"), "choices": [choice]}
    return {**chunk, "usage": None} if with_usage else chunk


def chat_logprobs(tokens: list[TokenOutput]) -> dict:
    """``{"content": [...]}``: each token decoded alone, its log-probability and the alternatives."""
    return {"content": [{**_chat_entry(_sampled(token)),
                         "top_logprobs": [_chat_entry(alternative) for alternative in token.top_logprobs]}
                        for token in tokens]}


def _chat_entry(entry: TokenLogProb) -> dict:
    return {"token": entry.text, "logprob": json_float(entry.log_prob), "bytes": list(entry.text.encode("utf-8"))}


def _sampled(token: TokenOutput) -> TokenLogProb:
    return token.sampled or TokenLogProb(token.token_id, token.text, token.log_prob)


# --- completions --------------------------------------------------------------------------


def completion(results: list[GenerationResult], *, header: ResponseHeader, usage: Usage, echo: bool,
               logprobs: bool) -> dict:
    """The ``text_completion`` object; ``results[i]`` is choice i, its ``prompt`` what ``echo``
    prepends."""
    choices = []
    for index, result in enumerate(results):
        prefix = result.prompt if echo else ""
        choices.append({
            "index": index,
            "text": prefix + result.text,
            "logprobs": completion_logprobs(result.tokens, len(prefix)) if logprobs else None,
            "finish_reason": finish_reason(result.finish_reason),
        })
    return {**header.fields("text_completion"), "choices": choices, "usage": usage.to_dict()}


def completion_chunk(text: str, *, header: ResponseHeader, index: int, token: TokenOutput | None = None,
                     logprobs: dict | None = None, with_usage: bool = False) -> dict:
    """One streamed ``text_completion`` of choice ``index``: ``text`` (a token's, or the echoed
    prompt), its ``logprobs`` object, and the finish reason when ``token`` is the last."""
    reason = finish_reason(token.finish_reason) if token is not None else None
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
    chunk = {**header.fields("text_completion"), "choices": [choice]}
    return {**chunk, "usage": None} if with_usage else chunk


def completion_logprobs(tokens: list[TokenOutput], text_offset: int = 0) -> dict:
    """The legacy ``logprobs`` object. ``text_offset`` is where the first token starts in the
    choice's text. NOTE: as OpenAI says, ``top_logprobs`` holds the chosen token too, so up to
    ``logprobs + 1`` entries; tokens that decode to the same text share one key."""
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(_sampled(token).text)
    return {
        "tokens": [_sampled(token).text for token in tokens],
        "token_logprobs": [json_float(token.log_prob) for token in tokens],
        "top_logprobs": [{entry.text: json_float(entry.log_prob) for entry in (*token.top_logprobs, _sampled(token))}
                         for token in tokens],
        "text_offset": offsets,
    }


# --- models and errors --------------------------------------------------------------------


def model_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model, created)]}


def model_card(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": OWNED_BY}


def error_body(error: LmiError, param: str | None = None) -> dict:
    """OpenAI's ``{"error": {"message", "type", "param", "code"}}``; ``code`` is the HTTP status."""
    return error_object(error.status, error.message, param)


def error_object(status: int, message: str, param: str | None = None) -> dict:
    kind = _ERROR_TYPES.get(status, "internal_server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def json_float(value: float) -> float | None:
    # NOTE: json.dumps writes -Infinity/NaN, which strict JSON parsers reject; null is valid.
    return value if math.isfinite(value) else None

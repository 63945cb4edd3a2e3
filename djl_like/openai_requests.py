"""Parse and validate OpenAI request bodies: chat completions (``messages``) and legacy
completions (``prompt``), into typed ``OpenAIRequest`` objects.

The routes under ``/v1`` stream exactly when the body says ``stream: true`` and then always as
SSE; an OpenAI chat body on ``/invocations`` follows LMI's ``option.output_formatter`` rule
instead (the caller passes its ``stream_rule``). A problem raises ``InvalidParameterError`` (a
400) naming the field, which OpenAI clients read as ``error.param``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from djl_like.errors import BadRequestError
from djl_like.fields import (PARAMETER_VALIDATORS, Validator, boolean, generation_params, integer,
                             load_json_object, number, shown)
from djl_like.protocol import GenerationParams

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
# NOTE: each choice is a sequence in the engine's queue; a bound keeps one request from filling it.
MAX_CHOICES = 128
# vLLM's default max_logprobs; OpenAI allows 20 top_logprobs (5 for completions).
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0
# OpenAI's default max_tokens for completions; chat keeps LMI's default (30).
COMPLETIONS_MAX_TOKENS = 16

# (stream flags the body set explicitly) -> (stream, output_formatter)
StreamRule = Callable[[list[bool]], tuple[bool, str]]


class InvalidParameterError(BadRequestError):
    """A 400 about one field of the body; ``param`` names it (OpenAI's ``error.param``)."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class OpenAIRequest:
    """One validated OpenAI request.

    Chat has ``messages`` (rendered later by the model's chat template); completions have
    ``prompts`` (text, or token ids), each answered by ``n`` choices. ``params`` are the
    generation parameters of the first choice (``choice_params`` gives all of them).
    ``params.logprobs`` is the number of top alternatives to report per token (chat's
    ``top_logprobs``, completions' ``logprobs``), or None when log-probabilities are off.
    """

    params: GenerationParams
    stream: bool
    output_formatter: str  # json for a whole answer; sse (or jsonlines on /invocations) for a stream
    messages: tuple[dict, ...] | None = None
    prompts: tuple[str | tuple[int, ...], ...] = ()
    n: int = 1
    include_usage: bool = False
    echo: bool = False
    unknown_parameters: tuple[str, ...] = ()

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def choice_params(self) -> list[GenerationParams]:
        """One parameter set per choice. NOTE: choice i samples with ``seed + i`` (vLLM's rule),
        so a seeded request is reproducible and its choices still differ."""
        seed = self.params.seed
        if seed is None or self.n == 1:
            return [self.params] * self.n
        return [replace(self.params, seed=(seed + index) % 2**64) for index in range(self.n)]


def v1_stream_rule(explicit: list[bool]) -> tuple[bool, str]:
    """``/v1``: a stream exactly when the body says so, always SSE (what OpenAI clients read)."""
    return (True, "sse") if any(explicit) else (False, "json")


def parse_chat_request(body: bytes, *, max_model_len: int | None = None) -> OpenAIRequest:
    """A ``/v1/chat/completions`` body."""
    payload = load_json_object(body)
    if "messages" not in payload:
        raise InvalidParameterError("messages is missing: this route takes an OpenAI chat body", "messages")
    return parse_chat_payload(payload, max_model_len=max_model_len, stream_rule=v1_stream_rule)


def parse_chat_payload(payload: dict, *, max_model_len: int | None, stream_rule: StreamRule) -> OpenAIRequest:
    """A chat body already loaded as a JSON object (``/v1/chat/completions`` or ``/invocations``)."""
    messages = _messages(payload["messages"])
    if "inputs" in payload:
        raise InvalidParameterError("inputs: send either 'inputs' or 'messages', not both", "inputs")
    values, unknown = _validate(payload, _CHAT_VALIDATORS, ignored=("messages", "model"))
    logprobs = _chat_logprobs(values.pop("logprobs", False), values.pop("top_logprobs", None))
    return _request(values, unknown, max_model_len, stream_rule, logprobs, messages=messages)


def parse_completion_request(body: bytes, *, max_model_len: int | None = None) -> OpenAIRequest:
    """A ``/v1/completions`` body."""
    payload = load_json_object(body)
    prompts = _completion_prompts(payload.get("prompt"))
    values, unknown = _validate(payload, _COMPLETION_VALIDATORS, ignored=("prompt", "model"))
    logprobs = values.pop("logprobs", None)
    if values.get("echo") and logprobs is not None:
        raise InvalidParameterError("echo with logprobs would need the prompt's log-probabilities, which this "
                                    "server does not compute; send one of them", "echo")
    values.setdefault("max_tokens", COMPLETIONS_MAX_TOKENS)
    return _request(values, unknown, max_model_len, v1_stream_rule, logprobs, prompts=prompts)


# --- shared -------------------------------------------------------------------------------


def _validate(payload: dict, validators: dict[str, Validator],
              ignored: tuple[str, ...]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Validate the known fields of ``payload``; return (values, unknown names). ``null`` means
    "the default" (OpenAI clients send it); ``ignored`` fields are read elsewhere or moot."""
    values: dict[str, Any] = {}
    unknown: list[str] = []
    for name, raw in payload.items():
        if name in ignored:
            continue
        if name not in validators:
            unknown.append(name)
        elif raw is not None:
            values[name] = _checked(validators[name], name, raw)
    return values, tuple(unknown)


def _checked(validator: Validator, name: str, raw: Any) -> Any:
    try:
        return validator(name, raw)
    except InvalidParameterError:
        raise
    except BadRequestError as error:
        raise InvalidParameterError(error.message, name) from None


def _request(values: dict[str, Any], unknown: tuple[str, ...], max_model_len: int | None,
             stream_rule: StreamRule, logprobs: int | None, *, messages: tuple[dict, ...] | None = None,
             prompts: tuple[str | tuple[int, ...], ...] = ()) -> OpenAIRequest:
    n = values.pop("n", 1)
    _check_best_of(values.pop("best_of", None), n)
    stream, output_formatter = stream_rule([values.pop("stream")] if "stream" in values else [])
    include_usage = _include_usage(values.pop("stream_options", None), stream)
    echo = values.pop("echo", False)
    for name in _ACCEPTED_ONLY:
        values.pop(name, None)
    lmi = _to_lmi(values)
    lmi["logprobs"] = logprobs
    params = _generation_params(lmi, max_model_len)
    return OpenAIRequest(params=params, stream=stream, output_formatter=output_formatter, messages=messages,
                         prompts=prompts, n=n, include_usage=include_usage, echo=echo, unknown_parameters=unknown)


def _generation_params(lmi: dict[str, Any], max_model_len: int | None) -> GenerationParams:
    try:
        return generation_params(lmi, "", max_model_len)
    except BadRequestError as error:  # max_tokens beyond the model, too many stops
        param = "max_tokens" if "max_tokens" in error.message else "stop"
        raise InvalidParameterError(error.message, param) from None


def _to_lmi(values: dict[str, Any]) -> dict[str, Any]:
    """Rename OpenAI parameters to LMI ones; sampling is on exactly when temperature > 0."""
    # NOTE: vLLM's rule: max_completion_tokens (the newer name) wins over max_tokens.
    if "max_completion_tokens" in values:
        values["max_tokens"] = values.pop("max_completion_tokens")
    lmi = {("max_new_tokens" if name == "max_tokens" else name): value for name, value in values.items()}
    lmi["do_sample"] = lmi.get("temperature", 0.0) > 0.0
    return lmi


def _check_best_of(best_of: int | None, n: int) -> None:
    if best_of is not None and best_of != n:
        raise InvalidParameterError(f"best_of={best_of}: choosing the best of several sequences is not "
                                    f"supported; leave it out or set it equal to n ({n})", "best_of")


def _include_usage(options: dict | None, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise InvalidParameterError("stream_options: only allowed when stream is true", "stream_options")
    return options.get("include_usage") is True


def _stream_options(field: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise BadRequestError(f"{field} must be an object, got {shown(value)}")
    if value.get("include_usage") is not None:
        boolean(f"{field}.include_usage", value["include_usage"])
    return value


def _logit_bias(field: str, value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}`` as sorted (id, bias) pairs; ids are checked against the
    vocabulary when the engine takes the request."""
    if not isinstance(value, dict):
        raise BadRequestError(f"{field} must be an object mapping token ids to biases, got {shown(value)}")
    pairs = []
    for key, bias in value.items():
        if not key.isdigit():
            raise BadRequestError(f"{field}: {shown(key)} is not a token id (a non-negative integer)")
        pairs.append((int(key), number(f"{field}[{key}]", bias, low=-MAX_LOGIT_BIAS, high=MAX_LOGIT_BIAS)))
    return tuple(sorted(pairs))


def _string(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequestError(f"{field} must be a string, got {shown(value)}")
    return value


def _no_tools(field: str, value: Any) -> list:
    if not isinstance(value, list):
        raise BadRequestError(f"{field} must be a list, got {shown(value)}")
    if value:
        raise BadRequestError(f"{field}: tool and function calling is not supported by this server")
    return value


def _text_response_format(field: str, value: Any) -> dict:
    if not isinstance(value, dict) or value.get("type") != "text":
        raise BadRequestError(f"{field}: only {{\"type\": \"text\"}} is supported (no JSON mode or "
                              f"schemas), got {shown(value)}")
    return value


def _no_suffix(field: str, value: Any) -> str:
    if _string(field, value):
        raise BadRequestError(f"{field}: inserting text before a suffix is not supported")
    return value


# Validated and then dropped: they change nothing in the generation.
_ACCEPTED_ONLY = ("user", "tools", "response_format", "suffix")
_SAMPLING_VALIDATORS: dict[str, Validator] = {
    name: PARAMETER_VALIDATORS[name]
    for name in ("temperature", "top_p", "stop", "seed", "frequency_penalty", "presence_penalty",
                 "top_k", "min_p", "repetition_penalty", "ignore_eos", "stream")
}
_COMMON_VALIDATORS: dict[str, Validator] = {
    **_SAMPLING_VALIDATORS,
    "max_tokens": PARAMETER_VALIDATORS["max_new_tokens"],
    "n": lambda f, v: integer(f, v, low=1, high=MAX_CHOICES),
    "best_of": lambda f, v: integer(f, v, low=1, high=MAX_CHOICES),
    "stream_options": _stream_options,
    "logit_bias": _logit_bias,
    "user": _string,
}
_CHAT_VALIDATORS: dict[str, Validator] = {
    **_COMMON_VALIDATORS,
    "max_completion_tokens": PARAMETER_VALIDATORS["max_new_tokens"],
    "logprobs": boolean,
    "top_logprobs": lambda f, v: integer(f, v, low=0, high=MAX_LOGPROBS),
    "tools": _no_tools,
    "response_format": _text_response_format,
}
_COMPLETION_VALIDATORS: dict[str, Validator] = {
    **_COMMON_VALIDATORS,
    "logprobs": lambda f, v: integer(f, v, low=0, high=MAX_LOGPROBS),
    "echo": boolean,
    "suffix": _no_suffix,
}


# --- chat ---------------------------------------------------------------------------------


def _chat_logprobs(logprobs: bool, top_logprobs: int | None) -> int | None:
    if top_logprobs is not None and not logprobs:
        raise InvalidParameterError("top_logprobs needs logprobs: true", "top_logprobs")
    return (top_logprobs or 0) if logprobs else None


def _messages(value: Any) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidParameterError(
            f"messages must be a non-empty list of {{role, content}} objects, got {shown(value)}", "messages")
    return tuple(_message(index, message) for index, message in enumerate(value))


def _message(index: int, message: Any) -> dict:
    field = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidParameterError(f"{field} must be an object with 'role' and 'content'", field)
    role = message.get("role")
    if not isinstance(role, str) or role not in CHAT_ROLES:
        raise InvalidParameterError(
            f"{field}.role must be one of {', '.join(CHAT_ROLES)}, got {shown(role)}", f"{field}.role")
    content = _message_content(f"{field}.content", message.get("content"))
    return {**message, "content": content}


def _message_content(field: str, content: Any) -> str:
    """Return the text of a message; OpenAI text parts are joined into one string."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(_is_text_part(part) for part in content):
        return "".join(part["text"] for part in content)
    raise InvalidParameterError(f"{field} must be a string or a list of text parts, got {shown(content)}", field)


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


# --- completions --------------------------------------------------------------------------


def _completion_prompts(value: Any) -> tuple[str | tuple[int, ...], ...]:
    """``prompt``: a string, a list of strings, a list of token ids, or a list of such lists."""
    if value is None:
        raise InvalidParameterError("prompt is missing: this route takes an OpenAI completions body", "prompt")
    if isinstance(value, str):
        return (_non_empty("prompt", value),)
    if isinstance(value, list) and value and all(_is_token_id(item) for item in value):
        return (tuple(value),)
    if not isinstance(value, list) or not value:
        raise InvalidParameterError(f"prompt must be a string, a list of strings or token ids, "
                                    f"got {shown(value)}", "prompt")
    return tuple(_one_prompt(f"prompt[{index}]", item) for index, item in enumerate(value))


def _one_prompt(field: str, value: Any) -> str | tuple[int, ...]:
    if isinstance(value, str):
        return _non_empty(field, value)
    if isinstance(value, list) and value and all(_is_token_id(item) for item in value):
        return tuple(value)
    raise InvalidParameterError(f"{field} must be a non-empty string or list of token ids, got {shown(value)}",
                                "prompt")


def _non_empty(field: str, text: str) -> str:
    if not text:
        raise InvalidParameterError(f"{field} must not be empty", "prompt")
    return text


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0

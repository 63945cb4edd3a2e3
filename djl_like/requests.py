"""Parse and validate ``/invocations`` bodies into typed ``InvocationRequest`` objects.

Two body shapes are accepted: LMI text generation (``inputs`` + ``parameters``) and OpenAI chat
(``messages`` + top-level OpenAI parameters). Every problem with the body raises
``BadRequestError`` naming the offending field, before anything reaches the engine. Unknown
parameters are not errors: they are returned in ``unknown_parameters`` for the route to warn
about, because users carry parameters meant for other engines.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from djl_like.errors import BadRequestError, PayloadTooLargeError
from djl_like.protocol import GenerationParams

STREAM_FORMATTERS = ("jsonlines", "sse")
CHAT_ROLES = ("system", "user", "assistant", "tool")
_MAX_SEED = 2**64 - 1  # torch.manual_seed refuses larger values
# NOTE: TGI allows 4 stop sequences by default and OpenAI 4; LMI clients merge `stop` and
# `stop_sequences`, so allow more, but a bound: every stop is matched against every generated
# character, and the longest one sets how much text a stream holds back.
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
# A lone surrogate can only come from a \uD800-\uDFFF escape: bodies without one skip the walk.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


@dataclass(frozen=True)
class InvocationRequest:
    """One validated ``/invocations`` request, ready for the route to submit.

    ``prompts`` holds the LMI ``inputs`` (one entry per prompt; empty for chat, whose prompt the
    tokenizer's chat template renders later from ``messages``). ``is_batch`` is true when
    ``inputs`` was a list, so the response must be a list too. ``output_formatter`` is ``json``
    for a whole response, ``jsonlines`` or ``sse`` for a stream.
    """

    prompts: tuple[str, ...]
    is_batch: bool
    params: GenerationParams
    stream: bool
    output_formatter: str
    unknown_parameters: tuple[str, ...] = ()
    messages: tuple[dict, ...] | None = None

    @property
    def is_chat(self) -> bool:
        """True for an OpenAI chat body (answered in the ``chat.completion`` shape)."""
        return self.messages is not None


def check_body_size(num_bytes: int, limit: int) -> None:
    """Raise ``PayloadTooLargeError`` (413) when a body of ``num_bytes`` exceeds ``limit``."""
    if num_bytes > limit:
        raise PayloadTooLargeError(
            f"request body is {num_bytes} bytes, over the limit of {limit} bytes"
        )


def parse_invocation(
    body: bytes, *, default_output_formatter: str = "json", max_model_len: int | None = None
) -> InvocationRequest:
    """Parse an ``/invocations`` body; raise ``BadRequestError`` naming the field on bad input.

    ``default_output_formatter`` is ``option.output_formatter``; ``max_model_len`` bounds an
    explicit ``max_new_tokens`` (prompt length is checked later, once it is tokenized).
    """
    payload = _load_json_object(body)
    if "messages" in payload:
        return _parse_chat(payload, default_output_formatter, max_model_len)
    return _parse_generation(payload, default_output_formatter, max_model_len)


# --- body ----------------------------------------------------------------------------------


def _load_json_object(body: bytes) -> dict:
    try:
        payload = json.loads(body.decode("utf-8-sig"), parse_constant=_reject_constant)
    except UnicodeDecodeError as err:
        raise BadRequestError(f"request body is not valid UTF-8: {err}") from None
    except (ValueError, RecursionError) as err:
        raise BadRequestError(f"request body is not valid JSON: {err}") from None
    if not isinstance(payload, dict):
        raise BadRequestError(
            f"request body must be a JSON object, got {type(payload).__name__}"
        )
    if _SURROGATE_ESCAPE.search(body):
        _check_encodable(payload)
    return payload


def _check_encodable(payload: dict) -> None:
    """Raise ``BadRequestError`` naming the first string that UTF-8 cannot encode.

    JSON may escape lone surrogates (``"\\ud800"``), which Python decodes into strings that
    the tokenizer, the chat template and the response encoder all refuse.
    """
    for field, text in _strings_in(payload):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise BadRequestError(
                f"{field} is not valid Unicode: character {err.start} is a lone surrogate "
                f"(U+{ord(text[err.start]):04X}), which UTF-8 cannot encode"
            ) from None


def _strings_in(value: Any) -> Iterator[tuple[str, str]]:
    """(field name, string) of every string in a JSON value, keys included, in body order.

    Iterative, so a body nested as deep as the JSON parser allows cannot overflow the stack.
    """
    pending: list[tuple[str, Any]] = [("body", value)]
    while pending:
        field, item = pending.pop()
        if isinstance(item, str):
            yield field, item
        elif isinstance(item, dict):
            prefix = "" if field == "body" else field + "."
            for key in item:
                yield f"a key of {field}", key
            pending.extend((prefix + key, child) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            pending.extend((f"{field}[{index}]", child)
                           for index, child in reversed(list(enumerate(item))))


def _reject_constant(name: str) -> Any:
    # NOTE: Python's json accepts NaN/Infinity, which would slip past every range check.
    raise ValueError(f"{name} is not a JSON value")


# --- field validators: each takes the field's qualified name and its raw JSON value ----------


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _boolean(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequestError(f"{field} must be true or false, got {_shown(value)}")
    return value


def _integer(field: str, value: Any, *, low: int, high: int | None = None) -> int:
    # NOTE: bool is a subclass of int in Python; JSON true is not a count.
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise BadRequestError(f"{field} must be an integer {bounds}, got {_shown(value)}")
    return value


def _number(
    field: str, value: Any, *, low: float, high: float | None = None, low_open: bool = False
) -> float:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not _in_range(value, low, high, low_open):
        raise BadRequestError(
            f"{field} must be a number {_range_text(low, high, low_open)}, got {_shown(value)}"
        )
    return float(value)


def _in_range(value: float, low: float, high: float | None, low_open: bool) -> bool:
    above_low = value > low if low_open else value >= low
    return math.isfinite(value) and above_low and (high is None or value <= high)


def _range_text(low: float, high: float | None, low_open: bool) -> str:
    if high is None:
        return f"> {low:g}" if low_open else f">= {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}]"


def _stop_sequences(field: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise BadRequestError(
            f"{field} must be a non-empty string or a list of non-empty strings, "
            f"got {_shown(value)}"
        )
    _check_stop_count(field, len(value))
    for index, stop in enumerate(value):
        if len(stop) > MAX_STOP_SEQUENCE_CHARS:
            raise BadRequestError(
                f"{field}[{index}] is {len(stop)} characters long; a stop sequence may have "
                f"at most {MAX_STOP_SEQUENCE_CHARS}"
            )
    return tuple(value)


def _check_stop_count(field: str, count: int) -> None:
    if count > MAX_STOP_SEQUENCES:
        raise BadRequestError(
            f"{field}: {count} stop sequences, over the limit of {MAX_STOP_SEQUENCES}"
        )


Validator = Callable[[str, Any], Any]

# Validators by parameter name; keys are the parameters this server understands.
_PARAMETER_VALIDATORS: dict[str, Validator] = {
    "max_new_tokens": lambda f, v: _integer(f, v, low=1),
    "temperature": lambda f, v: _number(f, v, low=0.0),
    "top_k": lambda f, v: _integer(f, v, low=0),
    "top_p": lambda f, v: _number(f, v, low=0.0, high=1.0, low_open=True),
    "min_p": lambda f, v: _number(f, v, low=0.0, high=1.0),
    "repetition_penalty": lambda f, v: _number(f, v, low=0.0, low_open=True),
    "presence_penalty": lambda f, v: _number(f, v, low=-2.0, high=2.0),
    "frequency_penalty": lambda f, v: _number(f, v, low=-2.0, high=2.0),
    "seed": lambda f, v: _integer(f, v, low=0, high=_MAX_SEED),
    "stop_sequences": _stop_sequences,
    "stop": _stop_sequences,
    "do_sample": _boolean,
    "details": _boolean,
    "return_full_text": _boolean,
    "ignore_eos": _boolean,
    "decoder_input_details": _boolean,
    "stream": _boolean,
}


def _validate_parameters(
    parameters: dict, known: dict[str, Validator], prefix: str
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Validate the known entries of ``parameters``; return (values, unknown names)."""
    values: dict[str, Any] = {}
    unknown: list[str] = []
    for name, raw in parameters.items():
        if name not in known:
            unknown.append(name)
        elif raw is not None:  # NOTE: TGI-style clients send null for "use the default"
            values[name] = known[name](prefix + name, raw)
    return values, tuple(unknown)


def _generation_params(
    values: dict[str, Any], prefix: str, max_model_len: int | None
) -> GenerationParams:
    """Build ``GenerationParams`` from validated values, merging ``stop`` into stop sequences.
    ``prefix`` is where the parameters sit in the body (``parameters.`` or nothing)."""
    values = dict(values)
    values.pop("stream", None)
    stops = values.pop("stop_sequences", ()) + values.pop("stop", ())
    values["stop_sequences"] = tuple(dict.fromkeys(stops))
    _check_stop_count(f"{prefix}stop + {prefix}stop_sequences",
                      len(values["stop_sequences"]))
    max_new_tokens_field = prefix + ("max_new_tokens" if prefix else "max_tokens")
    requested = values.get("max_new_tokens")
    if requested is not None and max_model_len is not None and requested > max_model_len:
        raise BadRequestError(
            f"{max_new_tokens_field} is {requested}, over option.max_model_len {max_model_len}"
        )
    return GenerationParams(**values)


def _select_stream(
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
    values, unknown = _validate_parameters(
        _parameters_object(payload), _PARAMETER_VALIDATORS, "parameters."
    )
    explicit = _explicit_streams(payload.get("stream"), values.get("stream"))
    stream, output_formatter = _select_stream(explicit, is_batch, default_output_formatter)
    unknown_top_level = tuple(k for k in payload if k not in _GENERATION_TOP_LEVEL)
    return InvocationRequest(
        prompts=prompts,
        is_batch=is_batch,
        params=_generation_params(values, "parameters.", max_model_len),
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
            f"inputs must be a string or a non-empty list of strings, got {_shown(inputs)}"
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
        raise BadRequestError(f"parameters must be a JSON object, got {_shown(parameters)}")
    return parameters


def _explicit_streams(top_level: Any, in_parameters: bool | None) -> list[bool]:
    flags = [] if top_level is None else [_boolean("stream", top_level)]
    return flags if in_parameters is None else flags + [in_parameters]


# --- OpenAI chat ---------------------------------------------------------------------------


def _single_choice(field: str, value: Any) -> int:
    if value != 1 or isinstance(value, bool):
        raise BadRequestError(f"{field} must be 1 (one choice per request), got {_shown(value)}")
    return 1


# OpenAI names mapped to the GenerationParams names they set.
_CHAT_RENAMES = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "logprobs": "details",
}
_CHAT_VALIDATORS: dict[str, Validator] = {
    "max_tokens": _PARAMETER_VALIDATORS["max_new_tokens"],
    "max_completion_tokens": _PARAMETER_VALIDATORS["max_new_tokens"],
    "logprobs": _boolean,
    "n": _single_choice,
    **{
        name: _PARAMETER_VALIDATORS[name]
        for name in (
            "temperature", "top_p", "stop", "seed", "stream", "frequency_penalty",
            "presence_penalty", "top_k", "min_p", "repetition_penalty", "ignore_eos",
        )
    },
}
_CHAT_IGNORED = ("messages", "model")  # NOTE: one model per endpoint, so 'model' is moot


def _parse_chat(
    payload: dict, default_output_formatter: str, max_model_len: int | None
) -> InvocationRequest:
    messages = _messages(payload["messages"])
    if "inputs" in payload:
        raise BadRequestError("inputs: send either 'inputs' or 'messages', not both")
    options = {k: v for k, v in payload.items() if k not in _CHAT_IGNORED}
    values, unknown = _validate_parameters(options, _CHAT_VALIDATORS, "")
    explicit = [values["stream"]] if "stream" in values else []
    stream, output_formatter = _select_stream(explicit, False, default_output_formatter)
    return InvocationRequest(
        prompts=(),
        is_batch=False,
        params=_generation_params(_chat_to_lmi(values), "", max_model_len),
        stream=stream,
        output_formatter=output_formatter,
        unknown_parameters=unknown,
        messages=messages,
    )


def _chat_to_lmi(values: dict[str, Any]) -> dict[str, Any]:
    """Rename OpenAI parameters to LMI ones; sampling is on exactly when temperature > 0."""
    values = dict(values)
    values.pop("n", None)
    # NOTE: vLLM's rule: max_completion_tokens (the newer name) wins over max_tokens.
    if "max_completion_tokens" in values:
        values.pop("max_tokens", None)
    lmi = {_CHAT_RENAMES.get(name, name): value for name, value in values.items()}
    lmi["do_sample"] = lmi.get("temperature", 0.0) > 0.0
    return lmi


def _messages(value: Any) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise BadRequestError(
            f"messages must be a non-empty list of {{role, content}} objects, got {_shown(value)}"
        )
    return tuple(_message(index, message) for index, message in enumerate(value))


def _message(index: int, message: Any) -> dict:
    field = f"messages[{index}]"
    if not isinstance(message, dict):
        raise BadRequestError(f"{field} must be an object with 'role' and 'content'")
    role = message.get("role")
    if not isinstance(role, str) or role not in CHAT_ROLES:
        raise BadRequestError(
            f"{field}.role must be one of {', '.join(CHAT_ROLES)}, got {_shown(role)}"
        )
    content = _message_content(f"{field}.content", message.get("content"))
    return {**message, "content": content}


def _message_content(field: str, content: Any) -> str:
    """Return the text of a message; OpenAI text parts are joined into one string."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(_is_text_part(part) for part in content):
        return "".join(part["text"] for part in content)
    raise BadRequestError(
        f"{field} must be a string or a list of text parts, got {_shown(content)}"
    )


def _is_text_part(part: Any) -> bool:
    return (
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    )

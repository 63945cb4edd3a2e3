"""Field validators shared by the request parsers (``djl_like.requests`` for LMI bodies,
``djl_like.openai_requests`` for OpenAI ones): the JSON body itself, then one validator per kind
of value. Each validator takes the field's qualified name and its raw JSON value, and raises
``BadRequestError`` naming the field."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

from djl_like.errors import BadRequestError
from djl_like.protocol import GenerationParams

_MAX_SEED = 2**64 - 1  # torch.manual_seed refuses larger values
# NOTE: TGI allows 4 stop sequences by default and OpenAI 4; LMI clients merge `stop` and
# `stop_sequences`, so allow more, but a bound: every stop is matched against every generated
# character, and the longest one sets how much text a stream holds back.
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
# A lone surrogate can only come from a \uD800-\uDFFF escape: bodies without one skip the walk.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


# --- body ----------------------------------------------------------------------------------


def load_json_object(body: bytes) -> dict:
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


def shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def boolean(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequestError(f"{field} must be true or false, got {shown(value)}")
    return value


def integer(field: str, value: Any, *, low: int, high: int | None = None) -> int:
    # NOTE: bool is a subclass of int in Python; JSON true is not a count.
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise BadRequestError(f"{field} must be an integer {bounds}, got {shown(value)}")
    return value


def number(
    field: str, value: Any, *, low: float, high: float | None = None, low_open: bool = False
) -> float:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not _in_range(value, low, high, low_open):
        raise BadRequestError(
            f"{field} must be a number {_range_text(low, high, low_open)}, got {shown(value)}"
        )
    return float(value)


def _in_range(value: float, low: float, high: float | None, low_open: bool) -> bool:
    above_low = value > low if low_open else value >= low
    return math.isfinite(value) and above_low and (high is None or value <= high)


def _range_text(low: float, high: float | None, low_open: bool) -> str:
    if high is None:
        return f"> {low:g}" if low_open else f">= {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}]"


def stop_sequences(field: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise BadRequestError(
            f"{field} must be a non-empty string or a list of non-empty strings, "
            f"got {shown(value)}"
        )
    check_stop_count(field, len(value))
    for index, stop in enumerate(value):
        if len(stop) > MAX_STOP_SEQUENCE_CHARS:
            raise BadRequestError(
                f"{field}[{index}] is {len(stop)} characters long; a stop sequence may have "
                f"at most {MAX_STOP_SEQUENCE_CHARS}"
            )
    return tuple(value)


def check_stop_count(field: str, count: int) -> None:
    if count > MAX_STOP_SEQUENCES:
        raise BadRequestError(
            f"{field}: {count} stop sequences, over the limit of {MAX_STOP_SEQUENCES}"
        )


Validator = Callable[[str, Any], Any]

# Validators by parameter name; keys are the parameters this server understands.
PARAMETER_VALIDATORS: dict[str, Validator] = {
    "max_new_tokens": lambda f, v: integer(f, v, low=1),
    "temperature": lambda f, v: number(f, v, low=0.0),
    "top_k": lambda f, v: integer(f, v, low=0),
    "top_p": lambda f, v: number(f, v, low=0.0, high=1.0, low_open=True),
    "min_p": lambda f, v: number(f, v, low=0.0, high=1.0),
    "repetition_penalty": lambda f, v: number(f, v, low=0.0, low_open=True),
    "presence_penalty": lambda f, v: number(f, v, low=-2.0, high=2.0),
    "frequency_penalty": lambda f, v: number(f, v, low=-2.0, high=2.0),
    "seed": lambda f, v: integer(f, v, low=0, high=_MAX_SEED),
    "stop_sequences": stop_sequences,
    "stop": stop_sequences,
    "do_sample": boolean,
    "details": boolean,
    "return_full_text": boolean,
    "ignore_eos": boolean,
    "decoder_input_details": boolean,
    "stream": boolean,
}


def validate_parameters(
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


def generation_params(
    values: dict[str, Any], prefix: str, max_model_len: int | None
) -> GenerationParams:
    """Build ``GenerationParams`` from validated values, merging ``stop`` into stop sequences.
    ``prefix`` is where the parameters sit in the body (``parameters.`` or nothing)."""
    values = dict(values)
    values.pop("stream", None)
    stops = values.pop("stop_sequences", ()) + values.pop("stop", ())
    values["stop_sequences"] = tuple(dict.fromkeys(stops))
    check_stop_count(f"{prefix}stop + {prefix}stop_sequences",
                      len(values["stop_sequences"]))
    max_new_tokens_field = prefix + ("max_new_tokens" if prefix else "max_tokens")
    requested = values.get("max_new_tokens")
    if requested is not None and max_model_len is not None and requested > max_model_len:
        raise BadRequestError(
            f"{max_new_tokens_field} is {requested}, over option.max_model_len {max_model_len}"
        )
    return GenerationParams(**values)

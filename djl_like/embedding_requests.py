"""Parse and validate text-embedding request bodies: LMI's ``/invocations`` shape
(``{"inputs": "text" | ["a", "b"]}``) and OpenAI's ``/v1/embeddings`` shape
(``{"input": ..., "encoding_format": "float" | "base64"}``). Every problem raises
``BadRequestError`` naming the field, before anything reaches the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from djl_like.errors import BadRequestError
from djl_like.fields import load_json_object

ENCODING_FORMATS = ("float", "base64")
# Keys of an OpenAI embeddings body that this server reads or may ignore without changing a result.
_OPENAI_KEYS = frozenset({"input", "model", "encoding_format", "dimensions", "user"})


@dataclass(frozen=True)
class EmbeddingRequest:
    """One validated embedding request. ``is_batch``: the input was a list, so the answer is one.
    ``unknown_parameters`` names what the server ignored (reported in a response header)."""

    texts: tuple[str, ...]
    is_batch: bool
    encoding_format: str = "float"
    model: str | None = None
    unknown_parameters: tuple[str, ...] = ()


def parse_embedding_invocation(body: bytes) -> EmbeddingRequest:
    """LMI: ``inputs`` a string or a list of strings; ``parameters`` (optional) are ignored."""
    payload = load_json_object(body)
    if "inputs" not in payload:
        raise BadRequestError("inputs is missing: send {\"inputs\": \"text\"} or {\"inputs\": [\"a\", \"b\"]}")
    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequestError("parameters must be a JSON object")
    texts, is_batch = _texts("inputs", payload["inputs"])
    return EmbeddingRequest(texts, is_batch, unknown_parameters=tuple(parameters))


def parse_openai_embeddings(body: bytes, dimension: int) -> EmbeddingRequest:
    """OpenAI: ``input`` a string or a list of strings (token arrays are refused: they would be
    another tokenizer's ids); ``dimensions``, if given, must be the model's own."""
    payload = load_json_object(body)
    if "input" not in payload:
        raise BadRequestError("input is missing: send {\"input\": \"text\"} or {\"input\": [\"a\", \"b\"]}")
    texts, is_batch = _texts("input", payload["input"])
    encoding_format = payload.get("encoding_format", "float")
    if encoding_format not in ENCODING_FORMATS:
        raise BadRequestError(f"encoding_format must be one of {', '.join(ENCODING_FORMATS)}, got {encoding_format!r}")
    dimensions = payload.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or dimensions != dimension):
        raise BadRequestError(f"dimensions={dimensions!r}: this model's embeddings have {dimension} dimensions, "
                              "which cannot be changed")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequestError("model must be a string")
    unknown = tuple(key for key in payload if key not in _OPENAI_KEYS)
    return EmbeddingRequest(texts, is_batch, encoding_format, model, unknown)


def _texts(field: str, value: Any) -> tuple[tuple[str, ...], bool]:
    if isinstance(value, str):
        return (_text(field, value),), False
    if not isinstance(value, list) or not value:
        raise BadRequestError(f"{field} must be a non-empty string or a non-empty list of strings")
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value) or any(
            isinstance(item, list) for item in value):
        raise BadRequestError(f"{field}: token arrays are not accepted (they would be another tokenizer's ids); "
                              "send text")
    return tuple(_text(f"{field}[{index}]", item) for index, item in enumerate(value)), True


def _text(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequestError(f"{field} must be a string, got {type(value).__name__}")
    if not value:
        raise BadRequestError(f"{field} is empty")
    return value  # (lone surrogates were refused with the body: fields.load_json_object)

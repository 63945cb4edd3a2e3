"""``Output``: what a custom handler's ``handle(inputs)`` returns, in the shape LMI handlers use.

A status code and message, properties (``Content-Type`` and other response headers), and content:
bytes under keys, or, for a stream, a generator of chunks (``add_stream_content``). For a dynamic
batch, member ``i``'s content goes under ``batch_<i>.<key>`` (``add(..., batch_index=i)``) and its
own properties under ``batch_<i>_<name>``; ``member_output`` cuts out one member's slice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from djl_like.errors import ModelError
from djl_like.pair_list import PairList

_MEMBER_CONTENT_KEY = re.compile(r"batch_(\d+)\.(.*)", re.DOTALL)
_MEMBER_PROPERTY_KEY = re.compile(r"batch_(\d+)[._](.*)", re.DOTALL)


def _json_default(value: Any) -> Any:
    """numpy and torch values (anything with ``tolist``/``item``) as plain JSON values."""
    for method in ("tolist", "item"):
        if callable(getattr(value, method, None)):
            return getattr(value, method)()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def encode_json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, default=_json_default,
                      separators=(",", ":")).encode("utf-8")


def default_stream_formatter(chunk: Any) -> bytes:
    """LMI's default stream frame: one ``{"outputs": chunk}`` JSON line per item."""
    return encode_json({"outputs": chunk}) + b"\n"


class Output:
    """A handler's answer to one request, or to every member of a batch."""

    def __init__(self, code: int = 200, message: str = "OK"):
        self.code = code
        self.message = message
        self.properties: dict[str, str] = {}
        self.content = PairList()
        self.stream_content: Iterator | None = None
        self.stream_output_formatter: Callable[[Any], Any] | None = None

    def __str__(self) -> str:
        return json.dumps({"code": self.code, "message": self.message, "properties": self.properties,
                           "content": self.content.get_keys()})

    def set_code(self, code: int) -> "Output":
        self.code = code
        return self

    def set_message(self, message: str) -> "Output":
        self.message = message
        return self

    def error(self, error: str, code: int = 424, message: str = "invoke handler failure") -> "Output":
        """Answer with ``code`` and the JSON body LMI sends: ``{"code", "message", "error"}``."""
        self.code = code
        self.message = message
        self.add_property("content-type", "application/json")
        return self.add_as_json({"code": code, "message": message, "error": error})

    def add_property(self, key: str, value: Any) -> "Output":
        self.properties[key] = str(value)
        return self

    def get_properties(self) -> dict[str, str]:
        return self.properties

    def get_property(self, key: str) -> str | None:
        wanted = key.lower()
        return next((value for name, value in self.properties.items() if name.lower() == wanted), None)

    def add(self, value: Any, key: str | None = None, batch_index: int | None = None) -> "Output":
        """Add ``value`` as bytes (text as UTF-8, anything else that is not bytes as JSON)."""
        if key is not None and not isinstance(key, str):
            key = str(key)
        if batch_index is not None:
            key = f"batch_{batch_index}.{key or ''}"
        if isinstance(value, str):
            value = value.encode("utf-8")
        elif not isinstance(value, (bytes, bytearray)):
            value = encode_json(value)
        self.content.add(key, bytes(value))
        return self

    def add_as_json(self, value: Any, key: str | None = None, batch_index: int | None = None) -> "Output":
        return self.add(encode_json(value), key=key, batch_index=batch_index)

    def add_stream_content(self, stream_content, output_formatter=default_stream_formatter) -> "Output":
        """Stream the items of ``stream_content`` (an iterable, read after ``handle`` returned),
        each passed through ``output_formatter`` (None: sent as they are)."""
        self.stream_content = iter(stream_content)
        self.stream_output_formatter = output_formatter
        return self

    # ---- reading it back (the server) -----------------------------------------------------
    @property
    def body(self) -> bytes:
        """The response body: the content under ``data``, else the first content (LMI's rule)."""
        if self.content.is_empty():
            return b""
        value = self.content.get("data")
        return value if value is not None else self.content.value_at(0)

    def stream_chunks(self) -> Iterator[bytes]:
        """The stream's items as bytes, after the formatter."""
        for item in self.stream_content:
            if self.stream_output_formatter is not None:
                item = self.stream_output_formatter(item)
            if isinstance(item, str):
                item = item.encode("utf-8")
            elif not isinstance(item, (bytes, bytearray)):
                item = encode_json(item)
            yield bytes(item)


class BatchOutputError(ModelError):
    """A handler's ``Output`` for a batch does not say what each member gets (a 424 for each)."""


def member_outputs(output: Output, batch_size: int) -> list[Output]:
    """One ``Output`` per member of a batch of ``batch_size`` (the output itself for one request).

    An error code (>= 300) goes to every member, as in DJL Serving. Raises ``BatchOutputError``
    when content is not keyed by member or a member got nothing.
    """
    if batch_size == 1:
        return [_single(output)]
    if output.stream_content is not None:
        raise BatchOutputError(f"handle returned stream content for a batch of {batch_size} requests; "
                               "streaming needs batch_size=1")
    if output.code >= 300:
        return [output] * batch_size
    members = [_member_shell(output, index) for index in range(batch_size)]
    for key, value in output.content:
        found = _MEMBER_CONTENT_KEY.fullmatch(key or "")
        if found is None or int(found[1]) >= batch_size:
            raise BatchOutputError(
                f"handle's Output for a batch of {batch_size} requests has content under key {key!r}; "
                "a batch member's content goes under batch_<i>.<name> (Output.add(value, batch_index=i))")
        members[int(found[1])].content.add(found[2] or None, value)
    missing = [index for index, member in enumerate(members) if member.content.is_empty()]
    if missing:
        raise BatchOutputError(f"handle's Output for a batch of {batch_size} requests has no content for "
                               f"batch member(s) {missing}")
    return members


def _single(output: Output) -> Output:
    """A lone request's output, with what a batch-aware handler keyed as member 0 unkeyed."""
    single = _member_shell(output, 0)
    for key, value in output.content:
        found = _MEMBER_CONTENT_KEY.fullmatch(key or "")
        single.content.add((found[2] or None) if found and found[1].lstrip("0") == "" else key, value)
    single.stream_content = output.stream_content
    single.stream_output_formatter = output.stream_output_formatter
    return single


def _member_shell(output: Output, index: int) -> Output:
    """Member ``index``'s code, message and properties: the shared ones, then its own
    (``batch_<i>_Content-Type`` ...)."""
    member = Output(output.code, output.message)
    for key, value in output.properties.items():
        found = _MEMBER_PROPERTY_KEY.fullmatch(key)
        if found is None:
            member.properties.setdefault(key, value)
        elif int(found[1]) == index:
            member.properties[found[2]] = value
    return member

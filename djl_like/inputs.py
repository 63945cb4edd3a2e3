"""``Input``: what a custom handler's ``handle(inputs)`` receives, in the shape LMI handlers use.

Properties are strings: on the init call the model's settings (``model_dir``, the serving.properties
options without their ``option.`` prefix ...), on a request its HTTP headers. Content holds the
body as bytes under the key ``data``. A dynamic batch is one ``Input`` carrying ``batch_size`` and,
per member ``i``, properties and content under ``batch_<iii>.``-prefixed keys, as DJL Serving
builds it; ``get_batches()`` splits it again.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

from djl_like.errors import BadRequestError
from djl_like.pair_list import PairList

BATCH_SIZE_KEY = "batch_size"
DATA_KEY = "data"
# DJL's member prefix: "batch_" + index (three digits, more past 999) + "." (handlers written for
# older DJL releases also use "_" as the separator; both are read).
_MEMBER_KEY = re.compile(r"batch_(\d+)[._](.*)", re.DOTALL)


class InvalidJsonInput(BadRequestError, ValueError):
    """The body is not the JSON a handler asked for: a 400 for this request if ``handle`` lets it
    through (a ``ValueError`` too, like ``json.JSONDecodeError``, for handlers that catch that)."""


class Input:
    """One request (or one dynamic batch of requests) for a custom handler."""

    def __init__(self, properties: dict[str, str] | None = None, content: PairList | None = None):
        self.function_name: str | None = None
        self.properties: dict[str, str] = dict(properties or {})
        self.content = content if content is not None else PairList()

    def __str__(self) -> str:
        return f"properties: {self.properties}, content keys: {self.content.get_keys()}"

    # ---- batches --------------------------------------------------------------------------
    def is_batch(self) -> bool:
        return BATCH_SIZE_KEY in self.properties

    def get_batch_size(self) -> int:
        return int(self.properties.get(BATCH_SIZE_KEY, "1"))

    def get_batches(self) -> list["Input"]:
        """One ``Input`` per member of a batch (``[self]`` when this is no batch)."""
        if not self.is_batch():
            return [self]
        members = [Input() for _ in range(self.get_batch_size())]
        for key, value in self.properties.items():
            found = _MEMBER_KEY.fullmatch(key)
            if found:
                members[int(found[1])].properties[found[2]] = value
        for key, value in self.content:
            found = _MEMBER_KEY.fullmatch(key or "")
            if found:
                members[int(found[1])].content.add(found[2], value)
        return members

    # ---- properties ---------------------------------------------------------------------------
    def get_function_name(self) -> str | None:
        return self.function_name

    def get_properties(self) -> dict[str, str]:
        return self.properties

    def get_property(self, key: str) -> str | None:
        """The value of ``key``, compared case-insensitively (HTTP header names are)."""
        wanted = key.lower()
        return next((value for name, value in self.properties.items() if name.lower() == wanted), None)

    # ---- content ------------------------------------------------------------------------------
    def get_content(self) -> PairList:
        return self.content

    def contains_key(self, key: str) -> bool:
        return self.content.get(key) is not None

    def is_empty(self) -> bool:
        """True for the init call, which carries properties and no body."""
        return self.content.is_empty()

    def get_data(self, key: str | None = None) -> Any:
        """The body decoded by its Content-Type: JSON, text, or else bytes (None when empty)."""
        content_type = (self.get_property("content-type") or "").lower()
        if self.content.is_empty():
            return None
        if content_type.startswith("application/json"):
            return self.get_as_json(key)
        if content_type.startswith("text/"):
            return self.get_as_string(key)
        return self.get_as_bytes(key)

    def get_as_bytes(self, key: str | None = None) -> bytes | None:
        if self.content.is_empty():
            return None
        if key:
            value = self.content.get(key)
            if value is None:
                raise KeyError(f"requested data for key:{key} is not found!")
            return value
        value = self.content.get(DATA_KEY)
        return value if value is not None else self.content.value_at(0)

    def get_as_string(self, key: str | None = None) -> str:
        try:
            return bytes(self.get_as_bytes(key) or b"").decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidJsonInput(f"request body is not valid UTF-8: {error}") from None

    def get_as_json(self, key: str | None = None) -> Any:
        try:
            return json.loads(self.get_as_string(key))
        except ValueError as error:
            raise InvalidJsonInput(f"request body is not valid JSON: {error}") from None

    def get_as_csv(self, key: str | None = None) -> list[dict]:
        return list(csv.DictReader(io.StringIO(self.get_as_string(key))))


def batch_input(members: list[Input]) -> Input:
    """The one ``Input`` that carries ``members`` as a dynamic batch (DJL's layout); a single
    member is passed as it is, as DJL Serving does."""
    if len(members) == 1:
        return members[0]
    batch = Input({BATCH_SIZE_KEY: str(len(members))})
    for index, member in enumerate(members):
        prefix = f"batch_{index:03d}."
        for key, value in member.properties.items():
            batch.properties[prefix + key] = value
        for key, value in member.content:
            batch.content.add(prefix + (key or DATA_KEY), value)
    return batch

"""The fewest tokens a text can encode to, known without tokenizing it.

A prompt far too long for the model is refused by its size alone, before the tokenizer spends
seconds of CPU on it (a multi-megabyte prompt takes that long). The bound is
``ceil(characters / (longest vocabulary entry in characters * normalizer shrink))``.

It only holds when no step of the tokenizer's pipeline drops characters or turns an unbounded
run of them into one token; the pipeline is read from the tokenizer's own description and, for
any step not known to be safe, there is no bound (every prompt is tokenized, as before).
"""

from __future__ import annotations

import functools
import json
import math
import sys
import unicodedata

from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel

# Pre-tokenizers that keep every character (Split and Punctuation unless told to remove).
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation"}


class PromptSizeBound:
    """``min_tokens(text)``: a lower bound on the tokens of ``text`` (0 when none is known)."""

    def __init__(self, max_characters_per_token: int | None):
        self.max_characters_per_token = max_characters_per_token

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> PromptSizeBound:
        """Read the bound off a ``tokenizers.Tokenizer`` (the Rust one behind a fast tokenizer)."""
        spec = json.loads(tokenizer.to_str())
        shrink = _normalizer_shrink(spec.get("normalizer"))
        safe = (shrink is not None and spec.get("truncation") is None
                and _keeps_characters(spec.get("pre_tokenizer"))
                and _model_covers_every_character(spec, tokenizer))
        if not safe:
            return cls(None)
        longest = max(len(token) for token in tokenizer.get_vocab(with_added_tokens=True))
        return cls(longest * shrink)

    def min_tokens(self, text: str) -> int:
        if self.max_characters_per_token is None:
            return 0
        return math.ceil(len(text) / self.max_characters_per_token)


def _normalizer_shrink(spec: dict | None) -> int | None:
    """How many times shorter the normalizer can make a text; None when it can drop characters."""
    if spec is None:
        return 1
    kind = spec["type"]
    if kind == "Sequence":
        factors = [_normalizer_shrink(step) for step in spec["normalizers"]]
        return None if None in factors else math.prod(factors)
    if kind in ("NFC", "NFKC"):
        # Composition merges at most one canonical decomposition into one character.
        return _longest_canonical_decomposition()
    if kind in ("NFD", "NFKD", "Prepend"):
        return 1
    if kind == "Replace":
        pattern = spec["pattern"].get("String")
        if pattern is None or len(spec["content"]) < len(pattern):
            return None  # a regular expression, or a replacement that shortens
        return 1
    return None


@functools.cache
def _longest_canonical_decomposition() -> int:
    return max(len(unicodedata.normalize("NFD", chr(code)))
               for code in range(sys.maxunicode + 1) if not 0xD800 <= code <= 0xDFFF)


def _keeps_characters(spec: dict | None) -> bool:
    if spec is None:
        return True
    if spec["type"] == "Sequence":
        return all(_keeps_characters(step) for step in spec["pretokenizers"])
    return spec["type"] in _KEEPING_PRE_TOKENIZERS and spec.get("behavior") != "Removed"


def _model_covers_every_character(spec: dict, tokenizer: Tokenizer) -> bool:
    """True when every character ends up in a token of its own span: none is skipped as
    unknown, and no run of unknown characters is fused into one token."""
    model = spec["model"]
    if model.get("byte_fallback"):
        return True
    if model["type"] != "BPE":
        return False  # Unigram fuses unknown runs; WordPiece and WordLevel map whole words
    if model.get("unk_token") is not None:
        return not model.get("fuse_unk")
    # NOTE: without an unknown token, BPE skips characters outside its vocabulary; a byte-level
    # pipeline only ever produces its 256 byte characters, so they must all be in it.
    return (_uses_byte_level(spec.get("pre_tokenizer"))
            and set(ByteLevel.alphabet()) <= set(tokenizer.get_vocab(with_added_tokens=False)))


def _uses_byte_level(spec: dict | None) -> bool:
    if spec is None:
        return False
    if spec["type"] == "Sequence":
        return any(_uses_byte_level(step) for step in spec["pretokenizers"])
    return spec["type"] == "ByteLevel"

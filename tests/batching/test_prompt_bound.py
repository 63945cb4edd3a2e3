"""The size bound that refuses a hopeless prompt without tokenizing it: never above the true
token count, and absent for tokenizers that can drop characters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer

from batching.prompt_bound import PromptSizeBound
from tests.tiny_models import CORPUS

TEXTS = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


@pytest.fixture(scope="module")
def byte_level(tiny_llama) -> Tokenizer:
    return AutoTokenizer.from_pretrained(tiny_llama).backend_tokenizer


def trained(model, trainer, normalizer=None, pre_tokenizer=None) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tokenizer


@pytest.fixture(scope="module")
def metaspace_nfc() -> Tokenizer:
    """Llama-2 / Mistral style (spaces become ▁, unknown characters become byte tokens), with
    Qwen2's NFC normalizer."""
    return trained(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True),
                   trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                       initial_alphabet=[f"<0x{i:02X}>" for i in range(256)]),
                   normalizers.NFC(), pre_tokenizers.Metaspace())


def bound_holds(tokenizer: Tokenizer, text: str) -> bool:
    return PromptSizeBound.of(tokenizer).min_tokens(text) <= len(tokenizer.encode(text).ids)


@settings(max_examples=300, deadline=None)
@given(text=TEXTS)
def test_byte_level_bound_never_exceeds_the_token_count(byte_level, text):
    assert bound_holds(byte_level, text)


@settings(max_examples=200, deadline=None)
@given(text=st.text("ae\u0301\u0323\u1100\u1161\u11a8 ▁", max_size=200))
def test_nfc_bound_holds_for_text_that_composition_shortens(metaspace_nfc, text):
    # e + two combining marks, and Hangul jamo, compose into single characters.
    assert PromptSizeBound.of(metaspace_nfc).max_characters_per_token is not None
    assert bound_holds(metaspace_nfc, text)


def test_a_long_prompt_is_bounded_by_its_length(byte_level):
    bound = PromptSizeBound.of(byte_level)
    longest = max(len(token) for token in byte_level.get_vocab(with_added_tokens=True))
    assert bound.max_characters_per_token == longest
    assert bound.min_tokens("pages " * 100_000) == -(-600_000 // longest)


@pytest.mark.parametrize("tokenizer", [
    # Whitespace pre-tokenization drops the spaces: a megabyte of spaces is no token at all.
    lambda: trained(models.BPE(unk_token="[UNK]"), trainers.BpeTrainer(special_tokens=["[UNK]"]),
                    pre_tokenizer=pre_tokenizers.Whitespace()),
    # A run of unknown characters fuses into one token.
    lambda: trained(models.BPE(unk_token="[UNK]", fuse_unk=True),
                    trainers.BpeTrainer(special_tokens=["[UNK]"]), pre_tokenizer=pre_tokenizers.Metaspace()),
    # WordPiece maps a whole unknown word to one token.
    lambda: trained(models.WordPiece(unk_token="[UNK]"), trainers.WordPieceTrainer(special_tokens=["[UNK]"]),
                    pre_tokenizer=pre_tokenizers.Metaspace()),
    # A normalizer that removes characters.
    lambda: trained(models.BPE(byte_fallback=True), trainers.BpeTrainer(),
                    normalizers.Sequence([normalizers.Strip()]), pre_tokenizers.Metaspace()),
], ids=["drops-spaces", "fuses-unknown", "wordpiece", "strips"])
def test_no_bound_when_characters_can_vanish(tokenizer):
    assert PromptSizeBound.of(tokenizer()).min_tokens(" " * 1_000_000) == 0

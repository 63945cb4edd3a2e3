"""Sampling parameters on the real tiny model: penalties match Hugging Face, seeds reproduce
whatever shares the batch, and the filters behave at their limits."""

from __future__ import annotations

import pytest
import torch

from batching.offline import generate
from batching.sampler import filter_logits
from djl_like.protocol import GenerationParams
from tests.batching.engine_helpers import make_engine, reference_tokens

PROMPTS = ["The capital of France is", "Once upon a time", "PagedAttention stores keys"]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return make_engine(tiny_llama, "paged", max_rolling_batch_size=8, max_model_len=128,
                       max_kv_cache_tokens=2048, block_size=8)


def tokens(result):
    return [t.token_id for t in result.tokens]


def test_repetition_penalty_matches_generate(engine, tiny_llama):
    params = GenerationParams(max_new_tokens=25, repetition_penalty=1.3)
    for prompt, result in zip(PROMPTS, generate(engine, PROMPTS, params)):
        expected = reference_tokens(tiny_llama, tuple(engine.tokenizer.encode(prompt)), 25, repetition_penalty=1.3)
        assert tokens(result) == expected


def test_seed_reproduces_regardless_of_batch_neighbours(engine):
    seeded = GenerationParams(max_new_tokens=20, do_sample=True, temperature=1.0, seed=1234, ignore_eos=True)
    alone = tokens(generate(engine, [PROMPTS[0]], seeded)[0])
    crowd = generate(engine, PROMPTS + [PROMPTS[0]], [GenerationParams(max_new_tokens=30, do_sample=True)] * 3 + [seeded])
    assert tokens(crowd[-1]) == alone
    other_seed = GenerationParams(max_new_tokens=20, do_sample=True, temperature=1.0, seed=99, ignore_eos=True)
    assert tokens(generate(engine, [PROMPTS[0]], other_seed)[0]) != alone


def test_top_k_one_samples_the_greedy_token(engine):
    greedy = generate(engine, PROMPTS, GenerationParams(max_new_tokens=15))
    top1 = generate(engine, PROMPTS, GenerationParams(max_new_tokens=15, do_sample=True, top_k=1, temperature=0.7))
    assert [tokens(r) for r in top1] == [tokens(r) for r in greedy]


def test_filters_keep_the_expected_tokens():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    kept = lambda **kw: torch.isfinite(filter_logits(logits, GenerationParams(**kw))).nonzero().flatten().tolist()  # noqa: E731
    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.5) == [0]  # the top token alone holds ~64% of the mass
    assert kept(top_p=0.9) == [0, 1, 2]
    assert kept(min_p=0.2) == [0, 1]  # p(1)/p(0) = e^-1 = 0.37 >= 0.2, p(2)/p(0) = 0.14 < 0.2
    assert kept() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("temperature", [1e-40, 1e-6])
def test_temperature_below_the_epsilon_samples_the_greedy_tokens(engine, temperature):
    greedy = generate(engine, PROMPTS, GenerationParams(max_new_tokens=12))
    tiny = generate(engine, PROMPTS, GenerationParams(max_new_tokens=12, do_sample=True, temperature=temperature))
    assert [tokens(r) for r in tiny] == [tokens(r) for r in greedy]

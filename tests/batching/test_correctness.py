"""The correctness invariant: greedy float32 output of every strategy equals Hugging Face
``model.generate`` for the same prompt, whatever else runs in the batch, for requests arriving
mid-decode, chunked prefills, preemptions and prefix-cache hits."""

from __future__ import annotations

import random

import pytest

from djl_like.protocol import GenerationParams
from tests.batching.engine_helpers import make_engine, reference_tokens

STRATEGIES = ["dynamic", "rolling", "paged"]


def random_prompts(tokenizer, count: int, seed: int, min_words=1, max_words=40) -> list[list[int]]:
    rng = random.Random(seed)
    words = "the of batching cache paged block token prompt 東京 café model serve request 🚀 step".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words))) for _ in range(count)]
    return [tokenizer.encode(text) for text in texts]


def run_staggered(engine, prompts, max_new_tokens, arrivals):
    """Submit prompt i after ``arrivals[i]`` engine steps (so some join while others decode),
    step the engine until everything finishes, return generated token ids per prompt."""
    handles = {}
    step = 0
    while len(handles) < len(prompts) or engine.batcher.has_unfinished:
        for i, arrival in enumerate(arrivals):
            if arrival == step and i not in handles:
                handles[i] = engine.submit(prompts[i], GenerationParams(max_new_tokens=max_new_tokens[i]))
        engine._drain_inbox()
        if engine.batcher.has_unfinished:
            engine.step()
        step += 1
    return [[t.token_id for t in handles[i].outputs(timeout=0)] for i in range(len(prompts))]


def assert_matches_generate(model_path, prompts, max_new_tokens, outputs):
    for prompt, limit, output in zip(prompts, max_new_tokens, outputs):
        assert output == reference_tokens(model_path, tuple(prompt), limit)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_concurrent_mixed_requests_match_generate(tiny_llama, strategy):
    engine = make_engine(tiny_llama, strategy, batch_size=4, max_batch_delay_ms=0, max_rolling_batch_size=6,
                         max_rolling_batch_prefill_tokens=32, max_model_len=256, max_kv_cache_tokens=256 * 6,
                         block_size=8)
    prompts = random_prompts(engine.tokenizer, 10, seed=1)
    max_new = [1, 5, 17, 40, 3, 25, 12, 33, 8, 20]
    arrivals = [0, 0, 0, 1, 3, 4, 9, 9, 15, 30]
    outputs = run_staggered(engine, prompts, max_new, arrivals)
    assert_matches_generate(tiny_llama, prompts, max_new, outputs)
    stats = engine.stats()
    assert stats["max_batch_size"] > 1
    assert stats["kv_tokens_reserved"] == 0 and stats["running"] == 0


@pytest.mark.parametrize("strategy", ["rolling", "paged"])
def test_long_prompts_are_chunked_and_decoding_continues(tiny_llama, strategy):
    engine = make_engine(tiny_llama, strategy, max_rolling_batch_size=4, max_rolling_batch_prefill_tokens=16,
                         max_model_len=384, max_kv_cache_tokens=384 * 4, block_size=16)
    prompts = random_prompts(engine.tokenizer, 4, seed=2, min_words=25, max_words=40)
    assert all(len(p) > 16 for p in prompts[1:]), "prompts must exceed the step budget"
    max_new = [30, 10, 10, 10]
    outputs = run_staggered(engine, prompts, max_new, arrivals=[0, 2, 2, 3])
    assert_matches_generate(tiny_llama, prompts, max_new, outputs)
    # The first request kept decoding while the long prompts were prefilled in chunks: every
    # step stayed within the budget, so there were many more steps than requests.
    assert engine.counters.steps >= sum(len(p) for p in prompts[1:]) // 16


def test_paged_preemption_recomputes_without_repeating_tokens(tiny_llama):
    # 12 blocks of 8 tokens for 4 sequences that each grow to ~60 tokens: they cannot all fit.
    engine = make_engine(tiny_llama, "paged", max_rolling_batch_size=4, max_rolling_batch_prefill_tokens=64,
                         max_model_len=96, max_kv_cache_tokens=96, block_size=8)
    prompts = random_prompts(engine.tokenizer, 5, seed=3, min_words=3, max_words=8)
    max_new = [40, 40, 35, 30, 45]
    outputs = run_staggered(engine, prompts, max_new, arrivals=[0, 0, 0, 1, 2])
    assert engine.batcher.num_preemptions > 0
    assert_matches_generate(tiny_llama, prompts, max_new, outputs)
    assert engine.batcher.block_manager.num_free_blocks == engine.batcher.block_manager.num_blocks


def test_prefix_caching_hits_and_matches_generate(tiny_llama):
    engine = make_engine(tiny_llama, "paged", max_rolling_batch_size=4, max_rolling_batch_prefill_tokens=48,
                         max_model_len=256, max_kv_cache_tokens=1024, block_size=8, enable_prefix_caching=True)
    system = engine.tokenizer.encode("You are a helpful assistant that answers about paged attention and the capital of France. " * 3)
    questions = random_prompts(engine.tokenizer, 6, seed=4, min_words=2, max_words=8)
    prompts = [system + q for q in questions]
    max_new = [12, 9, 15, 6, 10, 11]
    outputs = run_staggered(engine, prompts, max_new, arrivals=[0, 8, 9, 12, 30, 31])
    assert_matches_generate(tiny_llama, prompts, max_new, outputs)
    blocks = engine.stats()["blocks"]
    assert blocks["prefix_hits"] >= 5 * (len(system) // 8 - 1)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_second_architecture_matches_generate(tiny_qwen2, strategy):
    engine = make_engine(tiny_qwen2, strategy, batch_size=3, max_batch_delay_ms=0, max_rolling_batch_size=3,
                         max_rolling_batch_prefill_tokens=24, max_model_len=256, max_kv_cache_tokens=768, block_size=4)
    prompts = random_prompts(engine.tokenizer, 5, seed=5)
    max_new = [7, 20, 3, 15, 9]
    outputs = run_staggered(engine, prompts, max_new, arrivals=[0, 0, 2, 5, 5])
    assert_matches_generate(tiny_qwen2, prompts, max_new, outputs)


def test_gpt2_style_model_matches_generate(tiny_gpt2):
    engine = make_engine(tiny_gpt2, "paged", max_rolling_batch_size=3, max_rolling_batch_prefill_tokens=24,
                         max_model_len=256, max_kv_cache_tokens=768, block_size=4)
    prompts = random_prompts(engine.tokenizer, 4, seed=6)
    max_new = [7, 20, 3, 15]
    outputs = run_staggered(engine, prompts, max_new, arrivals=[0, 0, 2, 5])
    assert_matches_generate(tiny_gpt2, prompts, max_new, outputs)


def test_triton_backend_in_the_engine_matches_generate(tiny_llama):
    """The CUDA path (Triton K/V write + split-K decode) wired into the real engine, run on CPU
    under the Triton interpreter (tests/conftest.py sets it when there is no GPU)."""
    import os

    from kernels.attention import TritonBackend

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (no GPU here) or a GPU run of the kernel tests")
    engine = make_engine(tiny_llama, "paged", max_rolling_batch_size=3, max_rolling_batch_prefill_tokens=16,
                         max_model_len=128, max_kv_cache_tokens=512, block_size=4)
    reference_backend, engine.runner.backend = engine.runner.backend, TritonBackend()
    try:
        prompts = random_prompts(engine.tokenizer, 3, seed=7, min_words=2, max_words=6)
        max_new = [4, 6, 3]
        outputs = run_staggered(engine, prompts, max_new, arrivals=[0, 0, 2])
    finally:
        engine.runner.backend = reference_backend  # the runner is shared by the other tests
    assert_matches_generate(tiny_llama, prompts, max_new, outputs)

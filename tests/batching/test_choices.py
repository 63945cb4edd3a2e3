"""Several choices from one prompt (OpenAI's ``n``), top log-probabilities and logit_bias, on the
real tiny model: what the engine computes and what it emits."""

from __future__ import annotations

import math

import pytest

from batching.engine import HandleGroup
from djl_like.errors import BadRequestError
from djl_like.protocol import AbortReason, GenerationParams
from tests.batching.engine_helpers import make_engine

PROMPT = "A prompt long enough to fill two blocks of sixteen tokens, and a little more after them."
GREEDY = GenerationParams(max_new_tokens=4, ignore_eos=True)


def paged_engine(tiny_llama, prefix_caching: bool):
    return make_engine(tiny_llama, "paged", max_kv_cache_tokens=2048, block_size=16,
                       enable_prefix_caching=prefix_caching)


def run(engine, group: HandleGroup) -> dict[int, list]:
    engine.run_until_idle()
    outputs: dict[int, list] = {}
    for index, token in group.outputs(timeout=0):
        outputs.setdefault(index, []).append(token)
    return outputs


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_greedy_choices_are_alike_and_the_cache_computes_the_prompt_once(tiny_llama, prefix_caching):
    engine = paged_engine(tiny_llama, prefix_caching)
    group = HandleGroup()
    handles = engine.submit_choices(PROMPT, [GREEDY] * 3, group=group)
    outputs = run(engine, group)
    ids = [[token.token_id for token in outputs[index]] for index in range(3)]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 4
    num_prompt = handles[0].num_prompt_tokens
    full_blocks = (num_prompt - 1) // 16
    assert full_blocks >= 2
    decodes = 3 * 3
    if prefix_caching:  # choices 2 and 3 compute only what follows the first one's full blocks
        assert engine.counters.tokens_computed == num_prompt + 2 * (num_prompt - 16 * full_blocks) + decodes
        assert engine.batcher.block_manager.stats()["prefix_hits"] == 2 * full_blocks
    else:
        assert engine.counters.tokens_computed == 3 * num_prompt + decodes


def test_aborting_held_choices_frees_everything(tiny_llama):
    engine = paged_engine(tiny_llama, prefix_caching=True)
    group = HandleGroup()
    engine.submit_choices(PROMPT, [GREEDY] * 3, group=group)
    # Queued after the submission: the engine takes the abort while choice 2 is still held.
    group.handles[2].abort(AbortReason.CLIENT_DISCONNECTED)
    outputs = run(engine, group)
    assert sorted(outputs) == [0, 1] and all(len(tokens) == 4 for tokens in outputs.values())
    stats = engine.stats()
    assert (stats["running"], stats["waiting"], stats["blocks"]["used"]) == (0, 0, 0)
    assert stats["requests_aborted"] == {"client_disconnected": 1}


def test_top_logprobs_are_the_likeliest_tokens_and_include_the_greedy_one(tiny_llama):
    engine = paged_engine(tiny_llama, prefix_caching=False)
    handle = engine.submit("Hello", GenerationParams(max_new_tokens=3, ignore_eos=True, logprobs=4))
    engine.run_until_idle()
    for token in handle.outputs(timeout=0):
        values = [entry.log_prob for entry in token.top_logprobs]
        assert len(values) == 4 and values == sorted(values, reverse=True)
        assert token.top_logprobs[0].token_id == token.token_id
        assert math.isclose(token.sampled.log_prob, token.log_prob) and token.sampled.token_id == token.token_id
        assert math.log(sum(math.exp(value) for value in values)) <= 1e-6  # probabilities of one distribution


def test_logit_bias_bans_and_forces_tokens(tiny_llama):
    engine = paged_engine(tiny_llama, prefix_caching=False)
    plain = engine.submit("Hello", GenerationParams(max_new_tokens=1, ignore_eos=True))
    engine.run_until_idle()
    first = next(iter(plain.outputs(timeout=0))).token_id
    banned = engine.submit("Hello", GenerationParams(max_new_tokens=1, ignore_eos=True, logit_bias=((first, -100.0),)))
    forced = engine.submit("Hello", GenerationParams(max_new_tokens=3, ignore_eos=True, logit_bias=((7, 100.0),)))
    engine.run_until_idle()
    assert next(iter(banned.outputs(timeout=0))).token_id != first
    assert [token.token_id for token in forced.outputs(timeout=0)] == [7, 7, 7]
    with pytest.raises(BadRequestError, match="outside the vocabulary"):
        engine.submit("Hello", GenerationParams(logit_bias=((10**6, 1.0),)))

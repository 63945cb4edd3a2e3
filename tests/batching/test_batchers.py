"""Each batcher driven without a model: canned tokens stand in for the runner, so these tests
pin the scheduling policy itself (who runs when, how KV is reserved)."""

from __future__ import annotations

import time

import pytest

from batching.registry import BATCHERS, batcher_class
from batching.scheduler import SchedulerConfig
from batching.sequence import Sequence
from djl_like.errors import BadRequestError
from djl_like.protocol import FinishReason, GenerationParams


def make(strategy, *, max_num_seqs=4, budget=64, max_model_len=64, capacity=256, block_size=8, delay=0.0,
         prefix=False):
    contiguous = strategy != "paged"
    size = max_model_len if contiguous else block_size
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                             num_blocks=capacity // size, block_size=size, enable_prefix_caching=prefix,
                             max_batch_delay_s=delay)
    return batcher_class(strategy)(config)


def seq(num_prompt, max_new=4, first_token=1):
    return Sequence(list(range(first_token, first_token + num_prompt)), GenerationParams(max_new_tokens=max_new))


def step(batcher, token=7):
    """One scheduling step with a canned sampled token; finishes sequences at max_new_tokens."""
    out = batcher.schedule()
    sampling = out.sampling_sequences
    batcher.advance(out, [token] * len(sampling))
    for s in sampling:
        if s.num_output_tokens >= s.params.max_new_tokens:
            batcher.finish(s, FinishReason.LENGTH)
    return out


def test_unknown_strategy_lists_supported_names():
    with pytest.raises(ValueError, match="dynamic, rolling, paged"):
        batcher_class("orca")
    assert set(BATCHERS) == {"dynamic", "rolling", "paged"}


def test_dynamic_waits_for_a_full_batch_or_the_delay():
    batcher = make("dynamic", max_num_seqs=3, delay=0.2)
    batcher.add(seq(5))
    assert batcher.schedule().is_empty and 0 < batcher.seconds_until_ready() <= 0.2
    batcher.add(seq(5))
    batcher.add(seq(5))
    assert batcher.seconds_until_ready() == 0.0
    assert len(batcher.schedule().scheduled) == 3


def test_dynamic_runs_a_partial_batch_after_the_delay():
    batcher = make("dynamic", max_num_seqs=8, delay=0.05)
    batcher.add(seq(5))
    time.sleep(0.06)
    assert len(step(batcher).scheduled) == 1


def test_dynamic_batch_runs_until_all_members_finish_and_nobody_joins():
    batcher = make("dynamic", max_num_seqs=2)
    short, long = seq(3, max_new=1), seq(3, max_new=3)
    batcher.add(short)
    batcher.add(long)
    step(batcher)
    assert short.is_finished and not long.is_finished
    late = seq(3)
    batcher.add(late)
    assert [item.seq for item in step(batcher).scheduled] == [long]
    step(batcher)
    assert long.is_finished
    assert [item.seq for item in step(batcher).scheduled] == [late]


def test_rolling_new_requests_join_at_the_next_step():
    batcher = make("rolling")
    first = seq(4, max_new=10)
    batcher.add(first)
    step(batcher)
    second = seq(4)
    batcher.add(second)
    scheduled = {item.seq: item.num_new_tokens for item in step(batcher).scheduled}
    assert scheduled == {first: 1, second: 4}


def test_rolling_decodes_first_then_chunks_long_prompts_within_the_budget():
    batcher = make("rolling", budget=10, max_model_len=64)
    decoding = seq(3, max_new=20)
    batcher.add(decoding)
    step(batcher)
    long = seq(25)
    batcher.add(long)
    chunks = []
    while long.num_computed_tokens < long.num_prompt_tokens:
        out = step(batcher)
        assert out.scheduled[0].seq is decoding and out.scheduled[0].num_new_tokens == 1
        assert out.num_batched_tokens <= 10
        chunks.append(next(i.num_new_tokens for i in out.scheduled if i.seq is long))
    assert chunks == [9, 9, 7]


def test_rolling_holds_at_most_max_num_seqs_and_one_slot_each():
    batcher = make("rolling", max_num_seqs=2, max_model_len=64, capacity=256)
    for _ in range(3):
        batcher.add(seq(4, max_new=5))
    step(batcher)
    assert len(batcher.running) == 2 and len(batcher.waiting) == 1
    assert all(len(s.block_table) == 1 for s in batcher.running)
    assert batcher.stats()["kv_tokens_reserved"] == 2 * 64


def test_rolling_admission_is_limited_by_slots():
    batcher = make("rolling", max_num_seqs=8, max_model_len=64, capacity=128)
    for _ in range(4):
        batcher.add(seq(4))
    step(batcher)
    assert len(batcher.running) == 2


def test_paged_allocates_blocks_on_demand():
    batcher = make("paged", block_size=4, capacity=64)
    s = seq(5, max_new=10)
    batcher.add(s)
    step(batcher)
    assert len(s.block_table) == 2  # 5 computed tokens
    for _ in range(4):
        step(batcher)
    assert len(s.block_table) == 3  # 9 computed tokens -> 3 blocks of 4


def test_paged_preempts_the_newest_sequence_and_requeues_it_first():
    batcher = make("paged", block_size=4, capacity=16, max_model_len=16)  # 4 blocks
    old, new = seq(4, max_new=8), seq(4, max_new=8, first_token=50)
    batcher.add(old)
    step(batcher)
    batcher.add(new)
    while not batcher.num_preemptions:
        step(batcher)
    assert new in batcher.waiting and batcher.waiting[0] is new
    assert new.num_computed_tokens == 0 and new.block_table == []
    assert old in batcher.running
    generated_before = list(new.output_token_ids)
    while batcher.has_unfinished:
        step(batcher)
    # Recomputation resumed where it stopped: no token was generated twice.
    assert new.output_token_ids[: len(generated_before)] == generated_before
    assert new.num_output_tokens == 8
    assert batcher.block_manager.num_free_blocks == 4


def admit_two_sharing_a_prompt(max_new):
    """A prefix-caching paged batcher (4-token blocks) where a second 13-token prompt arrives one
    step after an identical first one; returns (batcher, second, the second step's output)."""
    batcher = make("paged", block_size=4, capacity=64, prefix=True)
    batcher.add(seq(13, max_new=max_new))
    step(batcher)
    second = seq(13, max_new=max_new)
    batcher.add(second)
    return batcher, second, step(batcher)


def test_paged_prefix_cache_skips_computed_blocks():
    batcher, second, out = admit_two_sharing_a_prompt(max_new=1)
    assert second.num_cached_tokens == 12
    assert out.scheduled[0].num_new_tokens == 1


@pytest.mark.parametrize("strategy", ["dynamic", "rolling", "paged"])
def test_requests_that_can_never_fit_are_refused(strategy):
    batcher = make(strategy, max_model_len=32, capacity=32, block_size=8)
    with pytest.raises(BadRequestError, match="32"):
        batcher.check_fits(seq(30, max_new=8))


@pytest.mark.parametrize("strategy", ["dynamic", "rolling", "paged"])
def test_finish_frees_kv_at_once_even_mid_prefill(strategy):
    batcher = make(strategy, budget=4)
    s = seq(20, max_new=5)
    batcher.add(s)
    step(batcher)
    assert batcher.block_manager.num_used_blocks > 0
    batcher.finish(s, FinishReason.ABORT)
    assert batcher.block_manager.num_used_blocks == 0 and not batcher.has_unfinished


def test_kv_waste_is_reported_per_strategy():
    rolling, paged = make("rolling", max_model_len=64), make("paged", block_size=8)
    for batcher in (rolling, paged):
        batcher.add(seq(10, max_new=20))
        step(batcher)
    assert rolling.stats()["kv_waste"] == pytest.approx(1 - 10 / 64)
    assert paged.stats()["kv_waste"] == pytest.approx(1 - 10 / 16)


def test_kv_waste_counts_a_shared_prefix_block_once():
    batcher, _, _ = admit_two_sharing_a_prompt(max_new=5)
    stats = batcher.stats()
    # 3 shared full blocks (12 tokens) + a tail block each: first holds tokens 12-13 (it has
    # decoded once), second holds token 12 (its only uncached prompt token).
    assert stats["kv_tokens_in_use"] == 12 + 2 + 1
    assert stats["kv_tokens_reserved"] == 5 * 4
    assert 0.0 <= stats["kv_waste"] == pytest.approx(1 - 15 / 20)


def test_paged_admission_keeps_a_free_block_per_running_sequence():
    batcher = make("paged", block_size=4, capacity=20, max_model_len=20, budget=64)  # 5 blocks
    running = seq(4, max_new=10)
    batcher.add(running)
    step(batcher)  # 4 prompt tokens computed; its first decode takes a 2nd block next step
    fits = seq(8, max_new=1, first_token=40)  # 2 blocks + 1 of headroom for `running` = the 3 free
    batcher.add(fits)
    assert any(item.seq is fits for item in step(batcher).scheduled)
    batcher.finish(fits, FinishReason.ABORT)
    too_big = seq(12, max_new=1, first_token=60)  # 3 blocks would leave `running` no room to grow
    batcher.add(too_big)
    assert all(item.seq is not too_big for item in step(batcher).scheduled)
    assert too_big in batcher.waiting


def test_prefix_cache_lookups_are_counted_once_per_admitted_sequence():
    batcher = make("paged", block_size=4, capacity=36, max_model_len=36, budget=64, prefix=True)  # 9 blocks
    batcher.add(seq(9, max_new=1))
    step(batcher)  # computed, finished: its two full blocks stay cached
    hog = seq(24, max_new=4, first_token=100)  # grows to 7 blocks, leaving the 2 cached ones
    batcher.add(hog)
    step(batcher)
    blocked = seq(9, max_new=1)  # the same prompt: a hit of two blocks, once admitted
    batcher.add(blocked)
    num_steps_blocked = 0
    while blocked in batcher.waiting:
        step(batcher)
        num_steps_blocked += 1
    assert num_steps_blocked >= 3
    blocks = batcher.stats()["blocks"]
    # Two admissions of 9-token prompts and one of 24 (2 + 5 + 2 queried full blocks): the
    # blocked head counted when it got in, not at each step it waited.
    assert (blocks["prefix_queries"], blocks["prefix_hits"]) == (2 + 5 + 2, 2)
    assert blocks["prefix_hit_rate"] == pytest.approx(2 / 9)

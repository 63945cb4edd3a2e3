"""``Batcher.kv_tokens_held()`` (the ``kv_tokens_in_use`` of ``/stats``) is O(running sequences):
it sums per-sequence fills and subtracts the block manager's count of shared references. These
tests drive real batchers without a model (canned tokens) through prefix hits, n > 1 choices,
chunked prefills, preemptions, aborts and finishes, and compare it in every state with the former
walk over every block of every running sequence, kept here as the oracle."""

from __future__ import annotations

import random
import threading

import pytest

from batching.block_manager import BlockManager
from batching.registry import batcher_class
from batching.scheduler import Batcher, SchedulerConfig
from batching.sequence import Sequence
from djl_like.errors import BadRequestError
from djl_like.protocol import FinishReason, GenerationParams


def walk_every_block(batcher: Batcher) -> int:
    """The former ``kv_tokens_held``: O(blocks held); a shared block counts once, at its fullest."""
    block_size = batcher.block_manager.block_size
    filled: dict[int, int] = {}
    for seq in list(batcher.running):
        computed = seq.num_computed_tokens + seq.num_in_flight_tokens
        for index, block in enumerate(list(seq.block_table)):
            in_block = max(0, min(block_size, computed - index * block_size))
            filled[block] = max(filled.get(block, 0), in_block)
    return sum(filled.values())


def shared_references(manager: BlockManager) -> int:
    return sum(max(0, manager.ref_count(block_id) - 1) for block_id in range(manager.num_blocks))


def check(batcher: Batcher) -> None:
    manager = batcher.block_manager
    assert manager.num_shared_references == shared_references(manager)
    # Only running sequences hold blocks (between the batcher's calls), and a shared block is full
    # in each of its holders: what makes the per-sequence sum minus the correction exact.
    holders: dict[int, list] = {}
    for seq in batcher.running:
        for index, block in enumerate(seq.block_table):
            holders.setdefault(block, []).append((seq, index))
    assert all(manager.ref_count(block) == len(held) for block, held in holders.items())
    for held in holders.values():
        if len(held) > 1:
            assert all(seq.num_computed_tokens >= (index + 1) * manager.block_size for seq, index in held)
    assert batcher.kv_tokens_held() == walk_every_block(batcher)
    stats = batcher.stats()
    assert stats["kv_tokens_in_use"] == walk_every_block(batcher) <= stats["kv_tokens_reserved"]


def make(strategy: str, *, block_size: int, num_blocks: int, prefix: bool, max_num_seqs: int = 6,
         budget: int = 24, max_model_len: int = 64) -> Batcher:
    size = block_size if strategy == "paged" else max_model_len
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                             num_blocks=num_blocks if strategy == "paged" else num_blocks * block_size // size,
                             block_size=size, enable_prefix_caching=prefix)
    return batcher_class(strategy)(config)


def drive(batcher: Batcher, rng: random.Random, num_steps: int) -> dict[str, int]:
    """Random arrivals (from a few shared prefixes; n > 1 choices arrive together or after their
    first one), steps with a canned token, random aborts; checks every intermediate state."""
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(1, 30))] for _ in range(3)]
    seen = {"preemptions": 0, "max_shared": 0, "finished": 0, "aborted": 0}
    pending_choices: list[tuple[Sequence, list[Sequence]]] = []
    for _ in range(num_steps):
        # Arrivals.
        for _ in range(rng.choice([0, 0, 1, 2])):
            suffix = [rng.randrange(1000) for _ in range(rng.randrange(0, 6))]
            prompt = (rng.choice(prefixes)[: rng.randrange(1, 31)] + suffix) or [1]
            params = GenerationParams(max_new_tokens=rng.randrange(1, 32))
            choices = [Sequence(list(prompt), params) for _ in range(rng.choice([1, 1, 2, 3]))]
            try:
                batcher.check_fits(choices[0])
            except BadRequestError:
                continue
            if len(choices) > 1 and rng.random() < 0.5:
                batcher.add(choices[0])  # the engine's way: the others wait for the first's prompt
                pending_choices.append((choices[0], choices[1:]))
            else:
                for choice in choices:
                    batcher.add(choice)
            check(batcher)
        for first, later in list(pending_choices):
            if first.is_finished or first.num_output_tokens > 0:
                for choice in later:
                    batcher.add(choice)
                pending_choices.remove((first, later))
        check(batcher)
        # The step: schedule (tokens in flight, what /stats mostly sees), then advance.
        output = batcher.schedule()
        seen["preemptions"] += len(output.preempted)
        seen["max_shared"] = max(seen["max_shared"], batcher.block_manager.num_shared_references)
        check(batcher)
        sampling = output.sampling_sequences
        batcher.advance(output, [rng.randrange(1000) for _ in sampling])
        check(batcher)
        for seq in sampling:
            if seq.num_output_tokens >= seq.params.max_new_tokens and not seq.is_finished:
                batcher.finish(seq, FinishReason.LENGTH)
                seen["finished"] += 1
                check(batcher)
        # Aborts, running or waiting.
        if rng.random() < 0.1 and batcher.has_unfinished:
            victim = rng.choice([*batcher.running, *batcher.waiting])
            batcher.finish(victim, FinishReason.ABORT)
            seen["aborted"] += 1
            check(batcher)
    # Drain: everything freed, nothing counted.
    for seq in [*batcher.running, *batcher.waiting]:
        batcher.finish(seq, FinishReason.ABORT)
    check(batcher)
    assert batcher.kv_tokens_held() == 0 and batcher.block_manager.num_shared_references == 0
    return seen


def random_paged_batcher(rng: random.Random) -> Batcher:
    """Prefix caching on, and a cache small enough for running sequences to preempt each other."""
    block_size = rng.choice([1, 2, 4, 8])
    return make("paged", block_size=block_size, num_blocks=rng.randrange(64, 128) // block_size + 2,
                prefix=True, budget=rng.choice([8, 24, 64]))


@pytest.mark.parametrize("seed", range(12))
def test_paged_with_prefix_caching_matches_the_block_walk(seed):
    rng = random.Random(seed)
    seen = drive(random_paged_batcher(rng), rng, num_steps=150)
    assert seen["finished"] > 0


def test_the_random_scenarios_reach_sharing_and_preemption():
    """The seeds above are not vacuous: together they share blocks and preempt sequences."""
    totals = {"preemptions": 0, "max_shared": 0}
    for seed in range(12):
        rng = random.Random(seed)
        seen = drive(random_paged_batcher(rng), rng, num_steps=150)
        totals = {key: totals[key] + seen[key] for key in totals}
    assert totals["preemptions"] > 0 and totals["max_shared"] > 0


@pytest.mark.parametrize("seed,strategy,prefix",
                         [(0, "paged", False), (1, "rolling", False), (2, "rolling", True), (3, "dynamic", False)])
def test_other_strategies_match_the_block_walk(seed, strategy, prefix):
    rng = random.Random(seed)
    batcher = make(strategy, block_size=4, num_blocks=40, prefix=prefix)
    drive(batcher, rng, num_steps=80)


def test_n_choices_share_the_prompt_blocks_and_count_them_once():
    batcher = make("paged", block_size=4, num_blocks=40, prefix=True, budget=64)
    prompt = list(range(1, 12))  # 11 tokens: two full blocks can be shared
    first = Sequence(prompt, GenerationParams(max_new_tokens=4))
    batcher.add(first)
    output = batcher.schedule()
    batcher.advance(output, [5])  # the prompt computed: its two full blocks are cached
    later = [Sequence(prompt, GenerationParams(max_new_tokens=4)) for _ in range(2)]
    for seq in later:
        batcher.add(seq)
    output = batcher.schedule()
    assert batcher.block_manager.num_shared_references == 2 * 2
    # In flight: `first` writes token 12 (11 + 1 = 12 tokens); each later choice its 3 prompt tokens
    # after the 8 cached ones. Shared: 8 tokens once.
    assert batcher.kv_tokens_held() == walk_every_block(batcher) == 12 + 2 * 3
    batcher.advance(output, [5] * len(output.sampling_sequences))
    check(batcher)
    batcher.finish(first, FinishReason.ABORT)
    assert batcher.block_manager.num_shared_references == 2
    check(batcher)


def test_stats_polled_from_another_thread_never_raises():
    """/stats runs on HTTP threads while the engine thread mutates the queues and block tables."""
    batcher = make("paged", block_size=2, num_blocks=60, prefix=True, budget=16)
    errors: list[BaseException] = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            try:
                stats = batcher.stats()
                assert stats["kv_tokens_in_use"] >= 0
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)
                return

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        drive(batcher, random.Random(7), num_steps=150)
    finally:
        done.set()
        poller.join()
    assert not errors, errors

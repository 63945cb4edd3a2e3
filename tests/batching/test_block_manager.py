"""Block manager: allocation arithmetic, refcounts, the free list, prefix caching, LRU eviction."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from batching.block_manager import (
    BlockManager,
    DoubleFreeError,
    NoFreeBlocksError,
    kv_waste_fraction,
)

# Python hashes ints modulo 2**61 - 1, so these two token ids (and tuples holding them) collide.
COLLIDING_TOKEN = 2**61


def make_sequence(manager: BlockManager, token_ids: list[int]) -> list[int]:
    """Admit a sequence the way the scheduler does: reuse its cached prefix, allocate the rest."""
    block_table: list[int] = []
    manager.acquire_prefix(block_table, manager.match_prefix(token_ids), token_ids)
    manager.allocate(block_table, len(token_ids))
    return block_table


def computed_sequence(manager: BlockManager, token_ids: list[int]) -> list[int]:
    """Admit a sequence, compute all its tokens and register its full blocks."""
    block_table = make_sequence(manager, token_ids)
    manager.register_full_blocks(block_table, token_ids, len(token_ids))
    return block_table


# --------------------------------------------------------------------------------- allocation


@pytest.mark.parametrize(
    ("table_len", "num_tokens", "expected"),
    [(0, 0, 0), (0, 1, 1), (0, 4, 1), (0, 5, 2), (1, 4, 0), (1, 5, 1), (2, 5, 0), (1, 13, 3)],
)
def test_blocks_needed_counts_only_new_blocks(table_len, num_tokens, expected):
    manager = BlockManager(num_blocks=8, block_size=4)
    assert manager.blocks_needed(list(range(table_len)), num_tokens) == expected


def test_allocate_grows_table_in_place_across_block_boundaries():
    manager = BlockManager(num_blocks=8, block_size=4)
    block_table: list[int] = []
    manager.allocate(block_table, 1)
    assert len(block_table) == 1
    first_block = block_table[0]
    manager.allocate(block_table, 4)  # still fits the first block
    assert block_table == [first_block]
    manager.allocate(block_table, 5)  # one token past the boundary
    assert len(block_table) == 2 and block_table[0] == first_block
    manager.allocate(block_table, 13)
    assert len(block_table) == 4 and len(set(block_table)) == 4
    assert manager.num_used_blocks == 4 and manager.num_free_blocks == 4


def test_allocate_refuses_exactly_and_never_partially():
    manager = BlockManager(num_blocks=3, block_size=4)
    first = make_sequence(manager, [0] * 8)  # 2 blocks, 1 left
    second: list[int] = []
    assert manager.can_allocate(1) and not manager.can_allocate(2)
    with pytest.raises(NoFreeBlocksError):
        manager.allocate(second, 9)  # needs 3
    assert second == [] and manager.num_free_blocks == 1
    with pytest.raises(NoFreeBlocksError):
        manager.allocate(first, 13)  # grow by 2 when 1 is free
    assert len(first) == 2 and manager.num_free_blocks == 1
    manager.allocate(second, 4)  # the last block still goes
    assert manager.num_free_blocks == 0


def test_free_restores_free_count_and_clears_table():
    manager = BlockManager(num_blocks=6, block_size=4)
    tables = [make_sequence(manager, [1] * n) for n in (3, 9, 4)]
    assert manager.num_used_blocks == 5
    for table in tables:
        manager.free(table)
        assert table == []
    assert manager.num_free_blocks == 6 and manager.num_used_blocks == 0


def test_double_free_raises_and_changes_nothing():
    manager = BlockManager(num_blocks=4, block_size=4)
    table = make_sequence(manager, [1] * 8)
    stale_copy = list(table)
    manager.free(table)
    with pytest.raises(DoubleFreeError):
        manager.free(stale_copy)
    assert manager.num_free_blocks == 4

    other = make_sequence(manager, [1] * 8)
    with pytest.raises(DoubleFreeError):
        manager.free([other[0], other[1], other[1]])  # block 1 has only one reference
    assert manager.ref_count(other[0]) == 1 and manager.ref_count(other[1]) == 1


def test_contiguous_mode_gives_one_block_per_sequence():
    max_model_len = 2048
    manager = BlockManager(num_blocks=3, block_size=max_model_len)
    tables = [make_sequence(manager, [7] * n) for n in (1, 700, max_model_len)]
    assert [len(table) for table in tables] == [1, 1, 1]
    manager.allocate(tables[0], 1500)  # decoding within its slot needs nothing new
    assert len(tables[0]) == 1
    assert not manager.can_allocate(manager.blocks_needed([], 1))  # a 4th sequence must wait
    manager.free(tables[1])
    assert len(make_sequence(manager, [7] * 5)) == 1


def test_prefix_caching_off_never_matches():
    manager = BlockManager(num_blocks=8, block_size=2)
    computed_sequence(manager, [1, 2, 3, 4, 5])
    assert manager.match_prefix([1, 2, 3, 4, 5]) == []
    assert manager.num_cached_blocks == 0 and manager.stats()["prefix_queries"] == 0


# --------------------------------------------------------------------------------- prefix caching


def test_identical_prefix_hits_the_same_blocks_and_shares_them():
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    first = computed_sequence(manager, list(range(10)))  # blocks 0 and 1 full
    second_tokens = list(range(10)) + [99]
    hits = manager.match_prefix(second_tokens)
    assert hits == first[:2]
    second = make_sequence(manager, second_tokens)
    assert second[:2] == first[:2] and second[2] != first[2]
    assert manager.ref_count(first[0]) == 2 and manager.ref_count(first[2]) == 1
    assert manager.num_used_blocks == 4


def test_different_token_in_block_k_stops_match_at_k():
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    tokens = list(range(13))  # 3 full blocks
    table = computed_sequence(manager, tokens)
    changed = list(tokens)
    changed[5] = 100  # inside block 1
    assert manager.match_prefix(changed) == table[:1]
    changed = list(tokens)
    changed[0] = 100  # block 0: nothing after it can match either
    assert manager.match_prefix(changed) == []


def test_match_never_covers_the_last_token():
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    table = computed_sequence(manager, list(range(8)))  # exactly 2 full blocks
    assert manager.match_prefix(list(range(8))) == table[:1]
    assert manager.match_prefix(list(range(9))) == table[:2]
    assert manager.match_prefix([0]) == [] and manager.match_prefix([]) == []


def test_only_blocks_full_of_computed_tokens_are_registered():
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    tokens = list(range(12))
    table = make_sequence(manager, tokens)
    manager.register_full_blocks(table, tokens, 7)  # a chunked prefill stopped mid block 1
    assert manager.match_prefix(tokens + [0]) == table[:1]
    manager.register_full_blocks(table, tokens, 12)
    assert manager.match_prefix(tokens + [0]) == table


def test_freed_blocks_still_hit_until_reallocated():
    manager = BlockManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    tokens = [5, 6, 7, 8, 9]
    table = computed_sequence(manager, tokens)
    cached = table[:2]
    manager.free(table)
    assert manager.num_free_blocks == 3 and manager.num_cached_blocks == 2
    assert manager.match_prefix(tokens) == cached

    reused: list[int] = []
    manager.acquire_prefix(reused, manager.match_prefix(tokens), tokens)
    assert manager.num_free_blocks == 1 and manager.num_cached_blocks == 0  # hits left free list
    manager.free(reused)

    other = make_sequence(manager, [1, 1, 1, 1, 1, 1])  # needs every block: evicts the cache
    assert manager.num_cached_blocks == 0
    manager.free(other)
    assert manager.match_prefix(tokens) == []


def test_eviction_takes_uncached_blocks_first_then_least_recently_freed():
    manager = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    first = computed_sequence(manager, [1, 2, 3])  # block 0 cached, block 1 partial
    second = computed_sequence(manager, [5, 6, 7])
    first_cached, first_partial = first
    second_cached, second_partial = second
    manager.free(first)
    manager.free(second)  # freed after first: more recently used

    taken = make_sequence(manager, [0] * 5)  # 3 blocks
    # Both partial blocks go before any cached block, although second_partial was freed after
    # first_cached; among cached blocks, the least recently freed one is evicted.
    assert taken == [first_partial, second_partial, first_cached]
    assert manager.match_prefix([1, 2, 3]) == []
    assert manager.match_prefix([5, 6, 7]) == [second_cached]


def test_reacquired_block_is_evicted_after_older_cached_blocks():
    manager = BlockManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    first = computed_sequence(manager, [1, 2])
    second = computed_sequence(manager, [3, 4])
    first_block, second_block = first[0], second[0]
    manager.free(first)
    manager.free(second)
    hit: list[int] = []
    manager.acquire_prefix(hit, manager.match_prefix([1, 2, 0]), [1, 2, 0])
    manager.free(hit)  # first's block is now the most recently freed cached block
    evicting = make_sequence(manager, [0] * 4)  # the uncached block, then the LRU cached one
    assert second_block in evicting and first_block not in evicting
    assert manager.match_prefix([1, 2, 0]) == [first_block]


def test_free_evicts_a_sequences_tail_before_its_head():
    manager = BlockManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    tokens = [1, 2, 3, 4, 5]
    table = computed_sequence(manager, tokens)
    head = table[0]
    manager.free(table)
    manager.allocate([], 4)  # one uncached block, then one cached block must go
    # Evicting the head would orphan the whole chain; evicting the tail keeps the head a hit.
    assert manager.match_prefix(tokens) == [head]


def test_identical_content_computed_twice_is_cached_once():
    manager = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    tokens = [1, 2, 3, 4, 5]
    holder, duplicate = make_sequence(manager, tokens), make_sequence(manager, tokens)
    manager.register_full_blocks(holder, tokens, 5)
    manager.register_full_blocks(duplicate, tokens, 5)
    holder_blocks, duplicate_blocks = list(holder), list(duplicate)
    manager.free(holder)
    manager.free(duplicate)
    assert manager.num_cached_blocks == 2
    # The duplicates are plain free blocks: new content takes them before any cached block.
    assert set(make_sequence(manager, [0] * 8)) == {holder_blocks[2], *duplicate_blocks}
    assert manager.match_prefix(tokens) == holder_blocks[:2]


def test_hit_rate_counts_full_blocks_once_per_admission():
    manager = BlockManager(num_blocks=12, block_size=4, enable_prefix_caching=True)
    tokens = list(range(12))
    computed_sequence(manager, tokens)  # its own admission: 2 queried, 0 hit
    for _ in range(5):  # lookups of a waiting sequence that does not fit yet count nothing
        assert len(manager.match_prefix(tokens + [50])) == 3
    make_sequence(manager, tokens + [50])  # 3 queried, 3 hit
    make_sequence(manager, [0, 1, 2, 3, 99, 5, 6, 7, 8])  # 2 queried, 1 hit
    make_sequence(manager, [0, 1])  # 0 queried
    stats = manager.stats()
    assert (stats["prefix_queries"], stats["prefix_hits"]) == (7, 4)
    assert stats["prefix_hit_rate"] == pytest.approx(4 / 7)


def test_hash_collisions_never_cause_a_wrong_hit():
    assert hash((1, 5)) == hash((COLLIDING_TOKEN, 5))  # the premise of this test
    manager = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=True)
    original = [1, 5, 7, 7, 9]
    colliding = [COLLIDING_TOKEN, 5, 7, 7, 9]
    original_table = computed_sequence(manager, original)
    assert manager.match_prefix(colliding) == []
    colliding_table = computed_sequence(manager, colliding)
    assert set(colliding_table).isdisjoint(original_table)
    assert manager.match_prefix(original) == original_table[:2]
    assert manager.match_prefix(colliding) == colliding_table[:2]


def test_duplicate_content_is_cached_once_and_survives_its_holder():
    manager = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    tokens = [1, 2, 3, 4, 5]
    # Both admitted before either registered, so both computed the same blocks.
    holder, duplicate = make_sequence(manager, tokens), make_sequence(manager, tokens)
    manager.register_full_blocks(holder, tokens, 5)
    manager.register_full_blocks(duplicate, tokens, 5)
    assert manager.match_prefix(tokens) == holder[:2]
    manager.free(holder)
    manager.free(make_sequence(manager, [0] * 6))  # evicts the holder's blocks
    assert manager.match_prefix(tokens) == []
    duplicate_blocks = list(duplicate)
    manager.free(duplicate)  # the duplicate now serves the prefix
    assert manager.match_prefix(tokens) == duplicate_blocks[:2]


def test_acquire_prefix_refuses_misuse():
    manager = BlockManager(num_blocks=2, block_size=2, enable_prefix_caching=True)
    table = computed_sequence(manager, [1, 2, 3])
    hits = manager.match_prefix([1, 2, 3])
    with pytest.raises(ValueError):
        manager.acquire_prefix([table[1]], hits, [1, 2, 3])  # table must be empty
    manager.free(table)
    manager.free(make_sequence(manager, [0] * 4))  # evicts the hit after the lookup
    with pytest.raises(ValueError):
        manager.acquire_prefix([], hits, [1, 2, 3])
    assert manager.num_free_blocks == 2


def test_can_allocate_counts_free_cached_hits_as_taken():
    manager = BlockManager(num_blocks=3, block_size=2, enable_prefix_caching=True)
    tokens = [1, 2, 3, 4, 5]
    manager.free(computed_sequence(manager, tokens))
    hits = manager.match_prefix(tokens + [6, 7])
    assert len(hits) == 2
    needed = manager.blocks_needed(hits, 7)  # 2 new blocks, but only 1 is free besides the hits
    assert needed == 2 and manager.can_allocate(needed) and not manager.can_allocate(needed, hits)
    assert manager.can_allocate(manager.blocks_needed(hits, 6), hits)


# --------------------------------------------------------------------------------- kv waste


def test_kv_waste_fraction():
    assert kv_waste_fraction([], block_size=16) == 0.0
    assert kv_waste_fraction([(0, 0)], block_size=16) == 0.0
    # contiguous: two slots of 8, holding 3 and 8 tokens
    assert kv_waste_fraction([(1, 3), (1, 8)], block_size=8) == pytest.approx(5 / 16)
    # paged: only the last block of each sequence is partly empty
    assert kv_waste_fraction([(3, 33), (1, 16)], block_size=16) == pytest.approx(15 / 64)
    with pytest.raises(ValueError):
        kv_waste_fraction([(1, 17)], block_size=16)


# --------------------------------------------------------------------------------- stateful


@dataclass
class ShadowSequence:
    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0


TOKENS = st.sampled_from([0, 1, 2, COLLIDING_TOKEN])  # tiny vocabulary: many shared prefixes


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives the manager like a scheduler would and checks it against a shadow model.

    The shadow records, for each block full of computed tokens, the whole token prefix its K/V
    was computed from; a prefix hit must return blocks whose recorded prefix equals the query.
    """

    @initialize(
        num_blocks=st.integers(1, 14),
        block_size=st.integers(1, 4),
        enable_prefix_caching=st.booleans(),
    )
    def setup(self, num_blocks, block_size, enable_prefix_caching):
        self.manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.sequences: dict[int, ShadowSequence] = {}
        self.next_seq_id = 0
        self.past_token_ids: list[list[int]] = [[]]
        self.computed_prefix: dict[int, tuple[int, ...]] = {}  # block id -> K/V context

    @rule(data=st.data())
    def admit_sequence(self, data):
        base = data.draw(st.sampled_from(self.past_token_ids))
        # Mostly a whole earlier sequence, so prefixes (and duplicates) are common.
        shared = base[: data.draw(st.just(len(base)) | st.integers(0, len(base)))]
        tail = data.draw(st.lists(TOKENS, min_size=1, max_size=3 * self.manager.block_size + 1))
        token_ids = shared + tail
        hits = self.manager.match_prefix(token_ids)
        self._check_hit(token_ids, hits)
        num_new_blocks = self.manager.blocks_needed(hits, len(token_ids))
        fits = self.manager.can_allocate(num_new_blocks, hits)
        block_table: list[int] = []
        self.manager.acquire_prefix(block_table, hits, token_ids)
        if not fits:
            num_free = self.manager.num_free_blocks
            with pytest.raises(NoFreeBlocksError):
                self.manager.allocate(block_table, len(token_ids))
            assert block_table == hits and self.manager.num_free_blocks == num_free
            self.manager.free(block_table)  # the scheduler backs out and keeps it waiting
            return
        self._allocate(block_table, len(token_ids))
        sequence = ShadowSequence(token_ids, block_table, len(hits) * self.manager.block_size)
        self.sequences[self.next_seq_id] = sequence
        self.next_seq_id += 1
        self.past_token_ids.append(token_ids)
        self._compute(sequence, data)  # its first prefill chunk

    @precondition(lambda self: self.sequences)
    @rule(data=st.data())
    def append_tokens(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.sequences)))
        sequence = self.sequences[seq_id]
        new_tokens = data.draw(st.lists(TOKENS, min_size=1, max_size=2 * self.manager.block_size))
        num_tokens = len(sequence.token_ids) + len(new_tokens)
        if self.manager.can_allocate(self.manager.blocks_needed(sequence.block_table, num_tokens)):
            self._allocate(sequence.block_table, num_tokens)
            sequence.token_ids.extend(new_tokens)
            return
        table_before = list(sequence.block_table)
        with pytest.raises(NoFreeBlocksError):
            self.manager.allocate(sequence.block_table, num_tokens)
        assert sequence.block_table == table_before
        self._free(seq_id)  # preempted

    @precondition(lambda self: self._pending_seq_ids())
    @rule(data=st.data())
    def compute_tokens(self, data):
        self._compute(self.sequences[data.draw(st.sampled_from(self._pending_seq_ids()))], data)

    @precondition(lambda self: self.sequences)
    @rule(data=st.data())
    def free_sequence(self, data):
        self._free(data.draw(st.sampled_from(sorted(self.sequences))))

    @invariant()
    def block_accounting_is_consistent(self):
        manager = self.manager
        assert manager.num_used_blocks + manager.num_free_blocks == manager.num_blocks
        assert 0 <= manager.num_cached_blocks <= manager.num_free_blocks
        free_ids = manager.free_block_ids()
        assert len(free_ids) == len(set(free_ids)) == manager.num_free_blocks
        holders: dict[int, int] = {}
        for sequence in self.sequences.values():
            assert len(set(sequence.block_table)) == len(sequence.block_table)
            assert len(sequence.block_table) == -(-len(sequence.token_ids) // manager.block_size)
            for block_id in sequence.block_table:
                holders[block_id] = holders.get(block_id, 0) + 1
        assert set(free_ids).isdisjoint(holders)
        for block_id in range(manager.num_blocks):
            assert manager.ref_count(block_id) == holders.get(block_id, 0)

    @invariant()
    def hit_statistics_are_bounded(self):
        stats = self.manager.stats()
        assert 0 <= stats["prefix_hits"] <= stats["prefix_queries"]

    def teardown(self):
        if not hasattr(self, "manager"):
            return
        for seq_id in sorted(self.sequences):
            self._free(seq_id)
        assert self.manager.num_free_blocks == self.manager.num_blocks

    def _check_hit(self, token_ids, hits):
        block_size = self.manager.block_size
        assert len(hits) <= max(0, (len(token_ids) - 1) // block_size)
        if not self.manager.enable_prefix_caching:
            assert hits == []
        for index, block_id in enumerate(hits):
            assert self.computed_prefix[block_id] == tuple(token_ids[: (index + 1) * block_size])

    def _allocate(self, block_table, num_tokens):
        num_before = len(block_table)
        self.manager.allocate(block_table, num_tokens)
        for block_id in block_table[num_before:]:
            self.computed_prefix.pop(block_id, None)  # reused for new content

    def _pending_seq_ids(self):
        return [
            seq_id
            for seq_id, sequence in sorted(self.sequences.items())
            if sequence.num_computed_tokens < len(sequence.token_ids)
        ]

    def _compute(self, sequence, data):
        """One step's chunk for ``sequence``: some of its uncomputed tokens get K/V."""
        remaining = len(sequence.token_ids) - sequence.num_computed_tokens
        sequence.num_computed_tokens += data.draw(st.integers(0, remaining))
        self._record_computed_blocks(sequence)
        self.manager.register_full_blocks(
            sequence.block_table, sequence.token_ids, sequence.num_computed_tokens
        )

    def _record_computed_blocks(self, sequence):
        block_size = self.manager.block_size
        for index in range(sequence.num_computed_tokens // block_size):
            prefix = tuple(sequence.token_ids[: (index + 1) * block_size])
            block_id = sequence.block_table[index]
            # A shared block must already hold exactly this prefix: a wrong hit would show here.
            assert self.computed_prefix.setdefault(block_id, prefix) == prefix

    def _free(self, seq_id):
        self.manager.free(self.sequences.pop(seq_id).block_table)


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockManagerStateMachine = BlockManagerMachine.TestCase

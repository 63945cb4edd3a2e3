"""The block manager: owns KV block ids, their reference counts, the free list and the prefix cache.

Every batching strategy uses it. The contiguous ones (dynamic, rolling) build it with
``block_size = max_model_len`` so each running sequence holds exactly one block (its slot); the
paged one uses small blocks and may turn on prefix caching. The scheduler is its only caller and
hands it plain lists (a sequence's ``block_table`` and ``token_ids``); it never sees a tensor.

Prefix caching keys each full block by its *chain*: block ``i`` of a sequence is identified by
(identity of block ``i - 1``, tokens of block ``i``), so a cache hit on block ``i`` implies the
whole prefix up to and including block ``i`` is the same, and its K/V can be reused.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Content id given to the (virtual) parent of a sequence's first block.
_ROOT_CONTENT_ID = 0

# (content id of the previous block, token ids of this block)
BlockKey = tuple[int, tuple[int, ...]]


class NoFreeBlocksError(RuntimeError):
    """Raised by ``allocate`` when the free list cannot cover the request; nothing was allocated."""


class DoubleFreeError(RuntimeError):
    """Raised by ``free`` when a block would drop below refcount 0: a scheduler bookkeeping bug."""


@dataclass(slots=True)
class _Block:
    ref_count: int = 0
    # Set once the block is full of computed tokens and registered (prefix caching only).
    key: BlockKey | None = None
    # Names the full token prefix ending with this block; identical prefixes share one id.
    content_id: int | None = None


class BlockManager:
    """Hands out KV block ids to block tables, counts references, and caches full prefix blocks.

    A block is *used* while its refcount is above 0 and *free* otherwise. A free block that still
    holds a registered prefix is *cached*: it can be handed back by ``match_prefix`` /
    ``acquire_prefix`` until ``allocate`` reuses it for other content (LRU eviction).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block() for _ in range(num_blocks)]
        # NOTE: two LRU lists (insertion order = free order) so allocation takes blocks without a
        # cached prefix first and evicts the least recently freed cached block only when it must.
        self._free_uncached: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._cached_block_by_key: dict[BlockKey, int] = {}
        self._content_ids = itertools.count(_ROOT_CONTENT_ID + 1)
        self._num_prefix_queries = 0
        self._num_prefix_hits = 0
        # Sum over blocks of max(0, refcount - 1), kept as references come and go.
        self._num_shared_references = 0

    # ----------------------------------------------------------------------------- counts

    @property
    def num_free_blocks(self) -> int:
        """Blocks with refcount 0, cached ones included (they are reusable)."""
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with refcount > 0."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks that still hold a registered prefix (a possible cache hit)."""
        return len(self._free_cached)

    @property
    def num_shared_references(self) -> int:
        """References beyond the first to blocks that several block tables hold: the sum over
        blocks of ``max(0, refcount - 1)``, kept up to date in O(1) per reference.

        Blocks are shared only through ``acquire_prefix``, which hands out only registered blocks,
        full of computed tokens; so summing tokens per block table counts each shared block
        ``refcount - 1`` times too many, by exactly ``block_size`` tokens each time.
        """
        return self._num_shared_references

    def ref_count(self, block_id: int) -> int:
        """How many block tables hold ``block_id``."""
        return self._blocks[block_id].ref_count

    def free_block_ids(self) -> list[int]:
        """Free block ids in the order ``allocate`` would take them (for tests and debugging)."""
        return [*self._free_uncached, *self._free_cached]

    # ----------------------------------------------------------------------------- allocation

    def blocks_needed(self, block_table: Sequence[int], num_tokens: int) -> int:
        """How many new blocks ``block_table`` needs to hold ``num_tokens`` tokens in total."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    def can_allocate(self, num_new_blocks: int, cached_blocks: Iterable[int] = ()) -> bool:
        """Whether ``num_new_blocks`` blocks can be allocated now.

        When admitting a sequence with a prefix hit, pass the hit as ``cached_blocks``: the ones
        that are free now stop being free once ``acquire_prefix`` takes them.
        """
        num_taken_by_hit = sum(1 for block_id in cached_blocks if block_id in self._free_cached)
        return num_new_blocks + num_taken_by_hit <= self.num_free_blocks

    def allocate(self, block_table: list[int], num_tokens: int) -> None:
        """Append new block ids to ``block_table`` (in place) so it holds ``num_tokens`` tokens.

        Raises ``NoFreeBlocksError`` and changes nothing when too few blocks are free.
        """
        num_new_blocks = self.blocks_needed(block_table, num_tokens)
        if not self.can_allocate(num_new_blocks):
            raise NoFreeBlocksError(
                f"need {num_new_blocks} blocks for {num_tokens} tokens, "
                f"{self.num_free_blocks} free of {self.num_blocks}"
            )
        block_table.extend(self._take_free_block() for _ in range(num_new_blocks))

    def free(self, block_table: list[int]) -> None:
        """Drop one reference to every block of ``block_table`` and clear it in place.

        Blocks reaching refcount 0 join the free list, tail first, so a sequence's last blocks are
        evicted before its first ones (those are the likeliest to be shared). Raises
        ``DoubleFreeError`` and changes nothing if a block would go below 0.
        """
        self._check_can_release(block_table)
        for block_id in reversed(block_table):
            self._release(block_id)
        block_table.clear()

    def _take_free_block(self) -> int:
        if self._free_uncached:
            block_id, _ = self._free_uncached.popitem(last=False)
        else:
            block_id, _ = self._free_cached.popitem(last=False)
            del self._cached_block_by_key[self._blocks[block_id].key]  # evicted
        block = self._blocks[block_id]
        block.ref_count, block.key, block.content_id = 1, None, None
        return block_id

    def _check_can_release(self, block_table: Sequence[int]) -> None:
        num_releases: dict[int, int] = {}
        for block_id in block_table:
            num_releases[block_id] = num_releases.get(block_id, 0) + 1
        for block_id, count in num_releases.items():
            if not 0 <= block_id < self.num_blocks:
                raise ValueError(f"block id {block_id} out of range [0, {self.num_blocks})")
            if count > self._blocks[block_id].ref_count:
                raise DoubleFreeError(
                    f"block {block_id} freed {count} times with refcount "
                    f"{self._blocks[block_id].ref_count}"
                )

    def _release(self, block_id: int) -> None:
        block = self._blocks[block_id]
        block.ref_count -= 1
        if block.ref_count > 0:
            self._num_shared_references -= 1
            return
        # The registered holder of its prefix stays cached; so does a duplicate whose holder was
        # evicted meanwhile: it takes the holder's place (same key, so its children still chain).
        if block.key is not None and self._claim_key(block.key, block_id) == block_id:
            self._free_cached[block_id] = None
        else:
            self._free_uncached[block_id] = None

    # ----------------------------------------------------------------------------- prefix cache

    def match_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Block ids of the longest cached run of full blocks that starts ``token_ids``.

        A pure lookup: takes no references and counts nothing (``acquire_prefix`` does both, for
        the sequence that is admitted). Never covers the last token, which must be computed to get
        logits. Returns [] when prefix caching is off.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent_content_id = _ROOT_CONTENT_ID
        for index in range(self._num_queryable_blocks(token_ids)):
            # NOTE: the key is compared by equality, not only by hash, so a hash collision (in the
            # tokens or the parent) can never return a block holding other tokens or context.
            key = (parent_content_id, self._block_tokens(token_ids, index))
            block_id = self._cached_block_by_key.get(key)
            if block_id is None:
                break
            hits.append(block_id)
            parent_content_id = self._blocks[block_id].content_id
        return hits

    def _num_queryable_blocks(self, token_ids: Sequence[int]) -> int:
        return max(0, (len(token_ids) - 1) // self.block_size)

    def acquire_prefix(
        self, block_table: list[int], cached_blocks: Sequence[int], token_ids: Sequence[int]
    ) -> None:
        """Admit a sequence: put the ``match_prefix(token_ids)`` hit ``cached_blocks`` into its
        empty ``block_table``, and count the lookup (once per admission, however many times the
        waiting sequence was looked up before it fitted).

        Each block gains a reference; a free cached one leaves the free list. Call it right after
        ``match_prefix`` (an ``allocate`` in between may evict a hit: that raises ``ValueError``).
        """
        if block_table:
            raise ValueError("acquire_prefix needs an empty block_table")
        for block_id in cached_blocks:
            if self._blocks[block_id].ref_count == 0 and block_id not in self._free_cached:
                raise ValueError(f"block {block_id} is no longer cached")
        for block_id in cached_blocks:
            self._free_cached.pop(block_id, None)
            block = self._blocks[block_id]
            if block.ref_count > 0:
                self._num_shared_references += 1
            block.ref_count += 1
        block_table.extend(cached_blocks)
        if self.enable_prefix_caching:
            self._num_prefix_queries += self._num_queryable_blocks(token_ids)
            self._num_prefix_hits += len(cached_blocks)

    def register_full_blocks(
        self, block_table: Sequence[int], token_ids: Sequence[int], num_computed_tokens: int
    ) -> None:
        """Make every block full of computed tokens findable by ``match_prefix``.

        Called after each step. Blocks already registered (or acquired from the cache) are left
        as they are; a block whose prefix is already cached under another id is recorded as a
        duplicate and not cached twice. A no-op when prefix caching is off.
        """
        if not self.enable_prefix_caching:
            return
        if not num_computed_tokens <= min(len(token_ids), len(block_table) * self.block_size):
            raise ValueError(
                f"num_computed_tokens={num_computed_tokens} exceeds the {len(token_ids)} tokens "
                f"or the {len(block_table)} blocks given"
            )
        num_full_blocks = num_computed_tokens // self.block_size
        first_new = num_full_blocks
        # Blocks are registered in order, so scan back only over the newly filled ones.
        while first_new > 0 and self._blocks[block_table[first_new - 1]].content_id is None:
            first_new -= 1
        for index in range(first_new, num_full_blocks):
            self._register_block(block_table, token_ids, index)

    def _claim_key(self, key: BlockKey, block_id: int) -> int:
        """Make ``block_id`` the cached holder of ``key`` unless one exists; return the holder."""
        return self._cached_block_by_key.setdefault(key, block_id)

    def _register_block(
        self, block_table: Sequence[int], token_ids: Sequence[int], index: int
    ) -> None:
        parent_content_id = (
            _ROOT_CONTENT_ID if index == 0 else self._blocks[block_table[index - 1]].content_id
        )
        key = (parent_content_id, self._block_tokens(token_ids, index))
        block_id = block_table[index]
        holder_id = self._claim_key(key, block_id)
        block = self._blocks[block_id]
        block.key = key
        # A duplicate shares its holder's content id, so its own children chain to the holder.
        is_new = holder_id == block_id
        block.content_id = next(self._content_ids) if is_new else self._blocks[holder_id].content_id

    def _block_tokens(self, token_ids: Sequence[int], index: int) -> tuple[int, ...]:
        return tuple(token_ids[index * self.block_size : (index + 1) * self.block_size])

    # ----------------------------------------------------------------------------- statistics

    def stats(self) -> dict[str, int | float]:
        """Block counts and prefix-cache counters (in full blocks, one lookup per admission)."""
        queries, hits = self._num_prefix_queries, self._num_prefix_hits
        return {
            "num_blocks": self.num_blocks,
            "used": self.num_used_blocks,
            "free": self.num_free_blocks,
            "cached": self.num_cached_blocks,
            "prefix_queries": queries,
            "prefix_hits": hits,
            "prefix_hit_rate": hits / queries if queries else 0.0,
        }


def kv_waste_fraction(tables: Iterable[tuple[int, int]], block_size: int) -> float:
    """Fraction of reserved KV slots that hold no token; 0.0 when nothing is reserved.

    Each pair is (number of blocks held, number of tokens held) for one sequence. Contiguous
    strategies waste the unused tail of a ``max_model_len`` slot; paged ones at most one
    partly filled block per sequence.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    num_reserved = num_held = 0
    for num_blocks_held, num_tokens_held in tables:
        if not 0 <= num_tokens_held <= num_blocks_held * block_size:
            raise ValueError(
                f"{num_tokens_held} tokens do not fit {num_blocks_held} blocks of {block_size}"
            )
        num_reserved += num_blocks_held * block_size
        num_held += num_tokens_held
    return (num_reserved - num_held) / num_reserved if num_reserved else 0.0

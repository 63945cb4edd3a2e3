"""PagedAttention batching: the rolling schedule over small KV blocks allocated on demand.

A sequence holds only the blocks its computed tokens need. When a running sequence needs a block
and none is free, the most recently admitted sequence is preempted: its blocks are freed and it
goes back to the front of the waiting queue, to be recomputed later (its client sees no repeated
token). With prefix caching, an admitted prompt reuses cached full blocks and computes the rest."""

from __future__ import annotations

from batching.rolling import RollingBatcher
from batching.scheduler import SchedulerOutput
from batching.sequence import Sequence, SequenceStatus


class PagedBatcher(RollingBatcher):
    name = "paged"

    def _reserve_for_admission(self, seq: Sequence, budget: int) -> int | None:
        manager = self.block_manager
        cached = manager.match_prefix(seq.token_ids)  # [] without prefix caching
        num_cached_tokens = len(cached) * manager.block_size
        num_new = min(seq.num_tokens - num_cached_tokens, budget)
        needed = manager.blocks_needed(cached, num_cached_tokens + num_new)
        # NOTE: keep one free block per running sequence: admitting into the last free blocks
        # only gets the newcomer preempted (its prefill wasted) as soon as the others grow.
        if not manager.can_allocate(needed + len(self.running), cached):
            return None
        manager.acquire_prefix(seq.block_table, cached, seq.token_ids)
        seq.num_computed_tokens = seq.num_cached_tokens = num_cached_tokens
        manager.allocate(seq.block_table, num_cached_tokens + num_new)
        return num_new

    def _reserve_for_step(self, seq: Sequence, num_new_tokens: int, output: SchedulerOutput) -> bool:
        manager = self.block_manager
        total = seq.num_computed_tokens + num_new_tokens
        while not manager.can_allocate(manager.blocks_needed(seq.block_table, total)):
            victim = self.running[-1]  # the most recently admitted
            self._preempt(victim, output)
            if victim is seq:
                return False
        manager.allocate(seq.block_table, total)
        return True

    def _preempt(self, seq: Sequence, output: SchedulerOutput) -> None:
        """Free the sequence's blocks and queue it first for recomputation."""
        output.scheduled = [item for item in output.scheduled if item.seq is not seq]
        output.preempted.append(seq)
        self.block_manager.free(seq.block_table)
        self.running.remove(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

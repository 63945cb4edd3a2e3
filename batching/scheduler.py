"""The batcher base: waiting and running queues, admission and the per-step schedule.

Strategies plug in by overriding ``_schedule()`` and, where KV reservation differs, the
allocation hooks ``_reserve_on_admit`` / ``_reserve_for_step``. The batcher is the only caller of
the block manager. It hands the runner plain data: sequences and how many new tokens each
computes this step.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field

from batching.block_manager import BlockManager
from batching.sequence import Sequence, SequenceStatus
from djl_like.errors import BadRequestError
from djl_like.protocol import FinishReason


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one batcher, fixed after the runner has sized the KV cache."""

    max_num_seqs: int  # max_rolling_batch_size, or batch_size for dynamic batching
    max_num_batched_tokens: int  # the step's token budget (max_rolling_batch_prefill_tokens)
    max_model_len: int
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = False
    max_batch_delay_s: float = 0.0


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step computes the sequence's last known token, so a new one is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """One step's batch: decodes first, then prefill chunks (the runner relies on that order)."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def sampling_sequences(self) -> list[Sequence]:
        return [item.seq for item in self.scheduled if item.samples]

    @property
    def num_batched_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)


class Batcher(ABC):
    """Holds the queues and the shared helpers of every strategy."""

    name: str = "base"

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager | None = None):
        self.config = config
        self.block_manager = block_manager or BlockManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.last_batch_size = 0

    # ---- requests in and out -------------------------------------------------------------
    def check_fits(self, seq: Sequence) -> None:
        """Refuse at once a request that could never be scheduled (raises BadRequestError)."""
        if seq.max_total_tokens > self.config.max_model_len:
            raise BadRequestError(
                f"prompt ({seq.num_prompt_tokens} tokens) + max_new_tokens ({seq.params.max_new_tokens}) "
                f"exceeds the model length limit of {self.config.max_model_len} tokens")
        needed = self.block_manager.blocks_needed([], self._reservation_tokens(seq))
        if needed > self.block_manager.num_blocks:
            raise BadRequestError(
                f"prompt + max_new_tokens ({seq.max_total_tokens} tokens) exceeds the KV cache capacity "
                f"({self.block_manager.num_blocks * self.block_manager.block_size} tokens)")

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Called once per sequence when it stops for any reason: frees its KV at once."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq.block_table)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def seconds_until_ready(self) -> float | None:
        """How long the engine may sleep before a schedule could return work (None: until a new
        request arrives; 0: now)."""
        return 0.0 if self.has_unfinished else None

    # ---- the step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences and the number of new tokens each computes."""
        output = self._schedule()
        output.scheduled.sort(key=lambda item: item.num_new_tokens > 1)
        for item in output.scheduled:
            item.seq.num_in_flight_tokens = item.num_new_tokens
        self.last_batch_size = len(output.scheduled)
        return output

    def advance(self, output: SchedulerOutput, sampled: list[int]) -> None:
        """After the runner ran ``output``: count computed tokens and append the sampled ones
        (``sampled`` follows ``output.sampling_sequences``)."""
        tokens = iter(sampled)
        for item in output.scheduled:
            seq = item.seq
            samples = item.samples
            seq.num_computed_tokens += item.num_new_tokens
            seq.num_in_flight_tokens = 0
            if self.block_manager.enable_prefix_caching:
                self.block_manager.register_full_blocks(seq.block_table, seq.token_ids, seq.num_computed_tokens)
            if samples:
                seq.token_ids.append(next(tokens))

    @abstractmethod
    def _schedule(self) -> SchedulerOutput:
        """Strategy-specific choice of who runs this step."""

    # ---- KV reservation hooks ------------------------------------------------------------
    def _reservation_tokens(self, seq: Sequence) -> int:
        """Tokens reserved when a sequence is admitted (contiguous: its whole worst case)."""
        return seq.max_total_tokens

    def _reserve_on_admit(self, seq: Sequence) -> bool:
        """Reserve KV for a waiting sequence about to run; False when it does not fit now."""
        needed = self.block_manager.blocks_needed(seq.block_table, self._reservation_tokens(seq))
        if not self.block_manager.can_allocate(needed):
            return False
        self.block_manager.allocate(seq.block_table, self._reservation_tokens(seq))
        return True

    def _admit(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.status = SequenceStatus.RUNNING

    # ---- statistics ----------------------------------------------------------------------
    def kv_tokens_held(self) -> int:
        """Cache slots holding a token, or being written by the step now running; a block shared
        through the prefix cache counts once.

        O(running sequences): each sequence holds ``min(computed + in flight, its blocks' slots)``
        tokens, and a block shared by ``r`` block tables is full in each of them (only full,
        computed blocks are shared), so the per-sequence sum counts it ``(r - 1) * block_size``
        tokens too many; the block manager keeps that sum of ``r - 1`` as references come and go.
        Called from HTTP threads too (mostly while a step runs): it copies the engine-owned
        ``running`` list and reads only integers and lengths, so it never raises; a read racing a
        step may be off by that step's change, never below 0."""
        manager = self.block_manager
        block_size = manager.block_size
        held = 0
        for seq in list(self.running):
            held += min(seq.num_computed_tokens + seq.num_in_flight_tokens, len(seq.block_table) * block_size)
        return max(0, held - manager.num_shared_references * block_size)

    def stats(self) -> dict:
        manager = self.block_manager
        tokens_held = self.kv_tokens_held()
        reserved = manager.num_used_blocks * manager.block_size
        return {
            "strategy": self.name,
            "waiting": len(self.waiting),
            "running": len(self.running),
            "last_batch_size": self.last_batch_size,
            "kv_capacity_tokens": manager.num_blocks * manager.block_size,
            "kv_block_size": manager.block_size,
            "kv_tokens_reserved": reserved,
            "kv_tokens_in_use": tokens_held,
            "kv_waste": 0.0 if reserved == 0 else 1.0 - tokens_held / reserved,
            "preemptions": self.num_preemptions,
            "blocks": manager.stats(),
        }


def now() -> float:
    return time.monotonic()

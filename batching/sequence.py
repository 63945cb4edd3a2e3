"""A Sequence: one prompt being generated. It owns its token ids, its block table and its
counters; the scheduler moves it between queues, the block manager fills its block table."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from djl_like.protocol import FinishReason, GenerationParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """``token_ids`` = prompt + generated tokens. ``num_computed_tokens`` of them have K/V in the
    cache; after preemption it drops to 0 and the tokens are recomputed (nothing is re-emitted)."""

    prompt_token_ids: list[int]
    params: GenerationParams
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_ids))
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(init=False)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_in_flight_tokens: int = 0  # scheduled in the step now running (their K/V is being written)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if not self.request_id:
            self.request_id = f"seq-{self.seq_id}"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while more than one token lacks K/V (a prompt, or a recompute after preemption)."""
        return self.num_uncomputed_tokens > 1

    @property
    def max_total_tokens(self) -> int:
        """Worst-case length: what contiguous strategies reserve for."""
        return self.num_prompt_tokens + self.params.max_new_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

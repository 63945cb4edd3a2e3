"""Dynamic (request-level) batching: a batch forms when ``batch_size`` requests wait or the oldest
has waited ``max_batch_delay``; it then runs until every member is done, and nobody joins it.
Each member holds a contiguous slot of ``max_model_len`` tokens for its whole life."""

from __future__ import annotations

from batching.scheduler import Batcher, ScheduledSequence, SchedulerOutput, now


class DynamicBatcher(Batcher):
    name = "dynamic"

    def seconds_until_ready(self) -> float | None:
        if self.running:
            return 0.0
        if not self.waiting:
            return None
        if len(self.waiting) >= self.config.max_num_seqs:
            return 0.0
        return max(0.0, self.waiting[0].arrival_time + self.config.max_batch_delay_s - now())

    def _schedule(self) -> SchedulerOutput:
        if not self.running:
            if self.seconds_until_ready() != 0.0:
                return SchedulerOutput()
            self._form_batch()
        # NOTE: request level, like a padded generate(): whole prompts in one step, no budget.
        return SchedulerOutput([ScheduledSequence(seq, seq.num_uncomputed_tokens) for seq in self.running])

    def _form_batch(self) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self._reserve_on_admit(seq):
                break
            self._admit(seq)

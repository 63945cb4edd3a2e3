"""Rolling (continuous, iteration-level) batching over contiguous KV slots (Orca-style).

Every step, running sequences get their decode token first; the rest of the token budget goes to
waiting prompts, a long prompt split into chunks across steps. Finished sequences leave at once.
Each running sequence holds one slot of ``max_model_len`` tokens (one block of that size)."""

from __future__ import annotations

from batching.scheduler import Batcher, ScheduledSequence, SchedulerOutput
from batching.sequence import Sequence, SequenceStatus


class RollingBatcher(Batcher):
    name = "rolling"

    def _schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self._schedule_running(output, self.config.max_num_batched_tokens)
        if not output.preempted:
            self._schedule_waiting(output, budget)
        return output

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> int:
        for seq in sorted(self.running, key=lambda s: s.is_prefill):  # decodes first
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue  # preempted earlier in this loop, or no budget left
            num_new = min(seq.num_uncomputed_tokens, budget)
            if self._reserve_for_step(seq, num_new, output):
                output.scheduled.append(ScheduledSequence(seq, num_new))
                budget -= num_new
        return budget

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_new = self._reserve_for_admission(seq, budget)
            if num_new is None:
                break
            self._admit(seq)
            output.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new

    def _reserve_for_admission(self, seq: Sequence, budget: int) -> int | None:
        """Reserve KV for a waiting sequence; the number of tokens it computes now, or None."""
        if not self._reserve_on_admit(seq):
            return None
        return min(seq.num_uncomputed_tokens, budget)

    def _reserve_for_step(self, seq: Sequence, num_new_tokens: int, output: SchedulerOutput) -> bool:
        """Contiguous slots already hold the worst case: nothing to grow."""
        return True

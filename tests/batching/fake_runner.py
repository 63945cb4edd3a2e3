"""A model runner that emits scripted tokens: lets engine tests choose exactly what text a
request generates (multi-byte characters, stop sequences, EOS) with the real tokenizer."""

from __future__ import annotations

import torch

from batching.engine import Engine
from batching.registry import batcher_class
from batching.scheduler import SchedulerConfig


class ScriptedRunner:
    """``scripts[prompt_text]`` is the list of token ids generated for that prompt, in order."""

    def __init__(self, tokenizer, eos_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.scripts: dict[tuple[int, ...], list[int]] = {}
        self.vocab_size = len(tokenizer)

    def script(self, prompt: str, continuation: list[int]) -> None:
        self.scripts[tuple(self.tokenizer.encode(prompt))] = continuation

    def execute(self, batch) -> torch.Tensor:
        rows = [torch.zeros(self.vocab_size)]  # like the real runner: one row when none samples
        for row, seq in enumerate(batch.sampling_sequences):
            script = self.scripts[tuple(seq.prompt_token_ids)]
            logits = torch.zeros(self.vocab_size)
            logits[script[seq.num_output_tokens % len(script)]] = 40.0
            rows[row:row + 1] = [logits]
        return torch.stack(rows)


def scripted_engine(tokenizer, eos_token_ids, strategy="rolling", job_queue_size=1000) -> tuple[Engine, ScriptedRunner]:
    runner = ScriptedRunner(tokenizer, eos_token_ids)
    block_size = 256 if strategy != "paged" else 8
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=256,
                             num_blocks=4096 // block_size, block_size=block_size)
    return Engine(runner, batcher_class(strategy)(config), job_queue_size=job_queue_size), runner

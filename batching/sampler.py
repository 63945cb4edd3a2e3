"""The sampler: turns the logits of the sequences that sample this step into tokens.

Greedy rows without penalties take one batched argmax; rows with penalties or sampling are
processed one by one (each keeps its own ``torch.Generator`` so a ``seed`` reproduces exactly,
whatever else shares the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from batching.sequence import Sequence
from djl_like.protocol import GenerationParams


def needs_processing(params: GenerationParams) -> bool:
    return (not params.is_greedy or params.repetition_penalty != 1.0 or bool(params.logit_bias)
            or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0)


@dataclass
class SamplerOutput:
    """One token per row, the model's raw log-probability of it, and, for the rows whose request
    asked for ``logprobs=N``, the N likeliest (token id, raw log-probability) pairs (else None)."""

    token_ids: list[int]
    log_probs: list[float]
    top_logprobs: list[list[tuple[int, float]] | None]


class Sampler:
    """Stateless apart from the per-sequence generators, which it creates on first use."""

    def __init__(self) -> None:
        self._generators: dict[int, torch.Generator] = {}

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: [len(seqs), V] float32."""
        # NOTE: vLLM's default semantics: the log-probability the model gave the token, before
        # penalties, temperature and filters; it says how likely the model found the token, and
        # does not turn into 0 because top_k=1 made the draw certain.
        logits = logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)  # before the penalties below change logits
        for row, seq in enumerate(seqs):
            if needs_processing(seq.params):
                logits[row] = apply_penalties(logits[row], seq)
        tokens = torch.argmax(logits, dim=-1)
        for row, seq in enumerate(seqs):
            if not seq.params.is_greedy:
                tokens[row] = self._draw(logits[row], seq)
        chosen = log_probs.gather(1, tokens[:, None])[:, 0].tolist()
        return SamplerOutput(tokens.tolist(), chosen, top_logprobs(log_probs, seqs))

    def forget(self, seq: Sequence) -> None:
        """Drop a finished sequence's generator."""
        self._generators.pop(seq.seq_id, None)

    def _draw(self, logits: torch.Tensor, seq: Sequence) -> int:
        probs = torch.softmax(filter_logits(logits / seq.params.temperature, seq.params), dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self._generator(seq)))

    def _generator(self, seq: Sequence) -> torch.Generator:
        generator = self._generators.get(seq.seq_id)
        if generator is None:
            generator = torch.Generator(device="cpu")
            if seq.params.seed is not None:
                generator.manual_seed(seq.params.seed)
            else:
                generator.seed()
            self._generators[seq.seq_id] = generator
        return generator


def top_logprobs(log_probs: torch.Tensor, seqs: list[Sequence]) -> list[list[tuple[int, float]] | None]:
    """The ``params.logprobs`` likeliest tokens of each row that asked for them, from one
    ``topk`` over those rows (log_probs: [len(seqs), V])."""
    wanted = [row for row, seq in enumerate(seqs) if seq.params.logprobs]
    result: list[list[tuple[int, float]] | None] = [None] * len(seqs)
    if not wanted:
        return result
    k = min(max(seqs[row].params.logprobs for row in wanted), log_probs.shape[-1])
    values, ids = torch.topk(log_probs[wanted], k, dim=-1)
    for row, row_ids, row_values in zip(wanted, ids.tolist(), values.tolist()):
        count = seqs[row].params.logprobs
        result[row] = list(zip(row_ids[:count], row_values[:count]))
    return result


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """Repetition penalty over prompt and output (Hugging Face semantics); presence and frequency
    penalties over the output only (OpenAI semantics); then OpenAI's logit_bias."""
    params = seq.params
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
        scores = logits[seen]
        logits[seen] = torch.where(scores < 0, scores * params.repetition_penalty,
                                   scores / params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and seq.num_output_tokens:
        ids, counts = torch.tensor(seq.output_token_ids, device=logits.device).unique(return_counts=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        logits[list(ids)] += torch.tensor(biases, dtype=logits.dtype, device=logits.device)
    return logits


def filter_logits(logits: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """top_k, then top_p (nucleus), then min_p; removed entries become -inf."""
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits

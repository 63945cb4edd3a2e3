"""The sampler: turns the logits of the sequences that sample this step into tokens, with one set
of tensor operations for the whole batch.

Pipeline (``Sampler.sample``), each stage a handful of batched tensor operations whatever the
batch holds; the per-row parameters become small tensors built once per call:

1. ``log_softmax`` of the raw logits: the log-probabilities reported (vLLM's default: before
   penalties, temperature and filters).
2. Fast path: when no row needs processing (all greedy, no penalty, no logit_bias), one
   ``argmax``; nothing else runs, so an all-greedy batch costs what it always did. On CPU, when
   no row asks for top log-probabilities either, one compiled pass per row gives the token and
   its log-probability (``greedy_rows``, stage 1 without the ``[rows, vocab]`` output), on the
   logits in the model's dtype.
3. Penalties, on a copy of the rows that need processing only: the repetition penalty over prompt
   and output (Hugging Face: negative scores multiplied, positive divided), presence and
   frequency penalties over the output (OpenAI: ``logit -= presence * (count > 0) + frequency *
   count``), then ``logit_bias``. They touch only the tokens a sequence holds, not the whole
   vocabulary: ``_TokenHistory`` keeps, per sequence with a penalty, the list of its distinct
   tokens and their output counts in two ``[slots, width]`` tensors on the logits' device. They
   are updated from the tokens appended since the last call (one indexed write for the batch,
   usually one token a row), so a step costs neither a host copy of every sequence's history nor
   a ``[rows, vocab]`` counts pass (measured on CPU: dense ``[rows, vocab]`` counts cost more than
   the per-row code they replace; the sparse lists cost ``rows x distinct tokens``). Padding
   columns repeat the row's first token, which makes their writes identical to the real ones.
4. Greedy rows (``is_greedy``, which includes temperature < 1e-5) take the ``argmax`` of the
   penalised logits.
5. Sampling rows: ``y = logits / temperature``, ``e = exp(y - max)`` (the top token weighs 1).
   top_k and top_p become one keep threshold per row on ``y``, found from the *values* of the
   sorted row: ``topk`` of the largest top_k + 1 values, or of NUCLEUS_CANDIDATES (256) for top_p
   alone; rows whose top_p cut is not decided within those (ties past the candidates, a larger
   nucleus) are redone with 16 times as many, up to a full ``sort`` (on a GPU, asking costs one
   sync when a row has top_p).
   top_k keeps every token >= the k-th value; top_p keeps the smallest sorted prefix whose mass
   reaches top_p (the first token always stays) and every token tied with the last one kept;
   min_p keeps ``e >= min_p`` (``p >= min_p * p_max``). Only values and sequential per-row sums
   decide, so neither the number of candidates (which depends on the other rows) nor the order
   ``topk``/``sort`` give equal logits changes a row's tokens.
6. The draw: one uniform ``u`` per sampling row, then inverse CDF for all rows at once over the
   kept weights in token-id order: ``cumsum``, ``searchsorted(cumsum, u * total, right=True)``
   (a token of weight 0 is never chosen).

On CPU, ``Workspace`` reuses the ``[rows, V]`` tensors from call to call (a fresh one of a few MB
costs more in page faults than the operation filling it), and masks are 1.0/0.0 floats
(comparisons that write bools, ``where`` and ``masked_fill`` are several times slower). The
caller's logits are never modified.

Reproducibility. A seeded row's uniform is a hash of ``(seed, number of output tokens so far)``
(``seeded_uniform``), so the token at each position depends only on the seed, the position and
the row's own logits: not on what else shares the batch, not on the ``Sampler`` instance, not on
preemption or a retried step. Choice i of an n > 1 request uses ``seed + i`` (the callers' rule).
Unseeded rows draw from the sampler's ``random.Random()``. NOTE: this changed the tokens a given
seed produces compared with the per-row ``torch.multinomial`` sampler this replaced; they are
reproducible from now on. Each row is computed with per-row operations only (elementwise ops,
per-row ``topk``/``sort`` values, sequential per-row ``cumsum`` and comparisons), so on CPU a
seeded row's tokens are the same alone or in any batch (the tests check float32 and
bfloat16-rounded logits). Where kernels may round differently for different shapes (GPUs), a
token could differ only when ``u`` falls within float rounding of a boundary between two tokens.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

import torch

from batching.sequence import Sequence
from djl_like.protocol import GenerationParams

# top_p without top_k: the candidates ``topk`` first takes before it falls back to a full sort.
NUCLEUS_CANDIDATES = 256


def needs_processing(params: GenerationParams) -> bool:
    return (not params.is_greedy or params.repetition_penalty != 1.0 or bool(params.logit_bias)
            or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0)


def needs_history(params: GenerationParams) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


@dataclass
class SamplerOutput:
    """One token per row, the model's raw log-probability of it, and, for the rows whose request
    asked for ``logprobs=N``, the N likeliest (token id, raw log-probability) pairs (else None)."""

    token_ids: list[int]
    log_probs: list[float]
    top_logprobs: list[list[tuple[int, float]] | None]


class Sampler:
    """Keeps the token histories of the sequences with penalties (``forget`` drops one), an RNG
    for unseeded rows, and on CPU the workspace tensors; everything else is computed per call."""

    def __init__(self) -> None:
        self._rng = random.Random()
        self._history = _TokenHistory()
        self._workspace = Workspace()
        self._native = None  # the compiled CPU kernels' module, False without them (looked up once)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: [len(seqs), V]; returns one token per row (see the module docstring)."""
        # NOTE: vLLM's default semantics: the log-probability the model gave the token, before
        # penalties, temperature and filters; it says how likely the model found the token, and
        # does not turn into 0 because top_k=1 made the draw certain.
        if self._all_plain_greedy(seqs) and (native := self._native_kernels(logits)) and logits.stride(-1) == 1:
            # One fused pass per row on the logits as the model gave them: no fp32 copy, no
            # [rows, vocab] log_softmax (0.28 against 0.97 ms for 32 x 49152 here).
            tokens, chosen = native.greedy_rows(logits)
            chosen_values = chosen.tolist()
            if not any(math.isnan(value) for value in chosen_values):
                return SamplerOutput(tokens.tolist(), chosen_values, [None] * len(seqs))
        logits = logits.float()
        ws = self._workspace
        log_probs = torch.log_softmax(logits, dim=-1,
                                      out=ws.get("log_probs", logits.shape, logits.dtype, logits.device))
        rows = [row for row, seq in enumerate(seqs) if needs_processing(seq.params)]
        if not rows:
            tokens = self._greedy(logits)
        elif len(rows) == len(seqs):
            tokens = self._sample_processed(logits, seqs, owned=False)
        else:
            tokens = torch.argmax(logits, dim=-1)
            index = torch.tensor(rows, device=logits.device)
            copy = ws.get("rows", (len(rows), logits.shape[1]), logits.dtype, logits.device)
            tokens[index] = self._sample_processed(torch.index_select(logits, 0, index, out=copy),
                                                   [seqs[row] for row in rows], owned=True)
        chosen = log_probs.gather(1, tokens[:, None])[:, 0].tolist()
        if not rows and any(math.isnan(value) for value in chosen):  # NaN logits: torch's argmax semantics
            tokens = torch.argmax(logits, dim=-1)
            chosen = log_probs.gather(1, tokens[:, None])[:, 0].tolist()
        return SamplerOutput(tokens.tolist(), chosen, top_logprobs(log_probs, seqs))

    @staticmethod
    def _all_plain_greedy(seqs: list[Sequence]) -> bool:
        """Every row greedy, unprocessed and without top log-probabilities: the token and its
        log-probability are all a step needs."""
        return not any(needs_processing(seq.params) or seq.params.logprobs for seq in seqs)

    def _native_kernels(self, logits: torch.Tensor):
        """The compiled CPU kernels' module for CPU logits, else None (looked up once)."""
        if self._native is None:
            from kernels import cpu_native

            self._native = (cpu_native.load() or False) if logits.device.type == "cpu" else False
        return self._native if self._native and logits.device.type == "cpu" else None

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """``argmax`` per row; on CPU by the compiled kernel where it is built (one vectorized pass:
        0.1 against torch's 0.9 ms for 32 x 49152 logits here), whose result for a row holding a
        NaN is unspecified: such rows have a NaN log-probability, and ``sample`` then redoes the
        batch with torch's argmax."""
        native = self._native_kernels(logits)
        if native and logits.stride(-1) == 1:
            return native.argmax_rows(logits)
        return torch.argmax(logits, dim=-1)

    def forget(self, seq: Sequence) -> None:
        """Drop a finished sequence's token history."""
        self._history.release(seq.seq_id)

    def _sample_processed(self, logits: torch.Tensor, seqs: list[Sequence], owned: bool) -> torch.Tensor:
        """Tokens of rows that all need processing (logits: [len(seqs), V]; ``owned``: a copy
        this call may overwrite, else the caller's, left alone)."""
        device, ws = logits.device, self._workspace
        if any(needs_history(seq.params) or seq.params.logit_bias for seq in seqs):
            if not owned:
                copy = ws.get("rows", logits.shape, logits.dtype, device)
                logits = logits.clone() if copy is None else copy.copy_(logits)
            logits = self.penalise(logits, seqs)
            owned = True
        sampling = [row for row, seq in enumerate(seqs) if not seq.params.is_greedy]
        if not sampling:
            return torch.argmax(logits, dim=-1)
        uniforms = [self._uniform(seqs[row]) for row in sampling]
        if len(sampling) == len(seqs):
            return draw(logits, [seq.params for seq in seqs], uniforms, overwrite=owned, workspace=ws)
        tokens = torch.argmax(logits, dim=-1)  # the greedy rows' tokens
        index = torch.tensor(sampling, device=device)
        rows = torch.index_select(logits, 0, index, out=ws.get("sampling", (len(sampling), logits.shape[1]),
                                                               logits.dtype, device))
        tokens[index] = draw(rows, [seqs[row].params for row in sampling], uniforms, overwrite=True, workspace=ws)
        return tokens

    @torch.inference_mode()
    def penalise(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Repetition, presence and frequency penalties, then logit_bias, in place on ``logits``
        ([len(seqs), V]); records the sequences' new tokens in their histories."""
        device = logits.device
        history_rows = [row for row, seq in enumerate(seqs) if needs_history(seq.params)]
        if history_rows:
            ids, counts = self._history.lookup([seqs[row] for row in history_rows], device)
            rows = torch.tensor(history_rows, device=device)[:, None].expand_as(ids)
            params = [seqs[row].params for row in history_rows]
            table = torch.tensor([[p.repetition_penalty, p.presence_penalty, p.frequency_penalty] for p in params],
                                 dtype=logits.dtype, device=device)
            if any(p.repetition_penalty != 1.0 for p in params):
                penalty = table[:, 0:1]
                scores = logits[rows, ids]
                # Padding columns repeat a real token: they write the same value.
                logits[rows, ids] = torch.where(scores < 0, scores * penalty, scores / penalty)
            if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
                # logit - (presence + frequency * count) for the output tokens; padding adds -0.
                offset = table[:, 1:2] * (counts > 0) + table[:, 2:3] * counts
                logits.index_put_((rows, ids), -offset, accumulate=True)
        bias_rows, bias_ids, biases = [], [], []
        for row, seq in enumerate(seqs):
            for token_id, bias in seq.params.logit_bias:
                bias_rows.append(row)
                bias_ids.append(token_id)
                biases.append(bias)
        if biases:
            index = (torch.tensor(bias_rows, device=device), torch.tensor(bias_ids, device=device))
            logits[index] = logits[index] + torch.tensor(biases, dtype=logits.dtype, device=device)
        return logits

    def _uniform(self, seq: Sequence) -> float:
        """This row's uniform in [0, 1): from (seed, position) for a seeded request."""
        if seq.params.seed is None:
            return self._rng.random()
        return seeded_uniform(seq.params.seed, seq.num_output_tokens)


def seeded_uniform(seed: int, position: int) -> float:
    """The uniform in [0, 1) that draws output token number ``position`` of a request seeded
    ``seed``: 53 bits of blake2b("seed:position")."""
    digest = hashlib.blake2b(b"%d:%d" % (seed, position), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0 ** -53


class Workspace:
    """Reused [rows, V] tensors for the CPU: a fresh tensor of a few MB costs the CPU page faults
    that take longer than the operation writing it (measured: ~2 ms per 6 MB). ``get`` gives a
    tensor to pass as ``out=``, valid until the next ``get`` of its name, or None (the operation
    allocates) off the CPU (CUDA's caching allocator does this already), below ``minimum``
    elements (where the slicing would cost more than it saves) and above ``limit``."""

    def __init__(self, minimum: int = 1 << 16, limit: int = 1 << 25) -> None:
        self.minimum, self.limit = minimum, limit
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor | None:
        numel = math.prod(shape)
        if numel < self.minimum or numel > self.limit or device.type != "cpu":
            return None
        buffer = self._buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            buffer = self._buffers[name] = torch.empty(numel, dtype=dtype)
        return buffer[:numel].view(shape)


NO_WORKSPACE = Workspace(limit=0)


def draw(logits: torch.Tensor, params: list[GenerationParams], uniforms: list[float],
         overwrite: bool = False, workspace: Workspace | None = None) -> torch.Tensor:
    """One token per row of ``logits`` ([R, V], penalised): temperature, the filters, then the
    inverse CDF of the kept weights at ``uniforms`` (one per row, in [0, 1)). ``overwrite``:
    ``logits`` may be divided in place."""
    device = logits.device
    ws = workspace or NO_WORKSPACE
    temperatures = torch.tensor([[p.temperature] for p in params], dtype=logits.dtype, device=device)
    scaled = torch.div(logits, temperatures,
                       out=logits if overwrite else ws.get("scaled", logits.shape, logits.dtype, device))
    weights, keep = _filter(scaled, params, ws)
    if keep is not None:
        weights.mul_(keep)
    cumulative = weights.cumsum_(-1)
    total = cumulative[:, -1:]
    u = torch.tensor([[value] for value in uniforms], dtype=logits.dtype, device=device)
    # u * total may round up to total: stay strictly below it, so a token of weight > 0 is found.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    # (clamped: NaN logits must not index past the vocabulary)
    return torch.searchsorted(cumulative, target, right=True)[:, 0].clamp_(max=logits.shape[-1] - 1)


def filter_logits(logits: torch.Tensor, params: GenerationParams | list[GenerationParams]) -> torch.Tensor:
    """top_k, then top_p (nucleus), then min_p; removed entries become -inf. ``logits``: [V] with
    one params, or [R, V] with one params per row. (``draw`` applies the same filters.)"""
    single = logits.dim() == 1
    rows = logits[None] if single else logits
    _, keep = _filter(rows, [params] if single else params, NO_WORKSPACE)
    filtered = rows.clone() if keep is None else rows.masked_fill(keep == 0, float("-inf"))
    return filtered[0] if single else filtered


def _filter(scaled: torch.Tensor, params: list[GenerationParams],
            ws: Workspace) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``exp(scaled - row max)`` ([R, V], the top token weighs 1) and the tokens top_k, top_p and
    min_p keep, as 1.0/0.0 of the same shape (None: all of them). (A float mask: comparisons that
    write floats are vectorised, bool masks and masked_fill much slower on CPU.)"""
    device = scaled.device
    weights = torch.sub(scaled, scaled.amax(-1, keepdim=True),
                        out=ws.get("weights", scaled.shape, scaled.dtype, device)).exp_()
    threshold = _thresholds(scaled, weights, params, ws)
    keep = None
    if threshold is not None:
        keep = torch.ge(scaled, threshold, out=ws.get("keep", scaled.shape, scaled.dtype, device))
    if any(p.min_p > 0.0 for p in params):
        # p < min_p * p_max  <=>  weight < min_p.
        min_p = torch.tensor([[p.min_p] for p in params], dtype=scaled.dtype, device=device)
        if keep is None:
            keep = torch.ge(weights, min_p, out=ws.get("keep", scaled.shape, scaled.dtype, device))
        else:
            keep.mul_(torch.ge(weights, min_p, out=ws.get("min_p", scaled.shape, scaled.dtype, device)))
    return weights, keep


def _thresholds(scaled: torch.Tensor, weights: torch.Tensor, params: list[GenerationParams],
                ws: Workspace) -> torch.Tensor | None:
    """Per row, the smallest value top_k and top_p keep ([R, 1], -inf for rows without them), or
    None when no row has them."""
    vocab = scaled.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    top_p = [p.top_p for p in params]
    rows = [row for row in range(len(params)) if top_k[row] or top_p[row] < 1.0]
    if not rows:
        return None
    if len(rows) == len(params):
        return _sorted_thresholds(scaled, weights, top_k, top_p, ws)
    threshold = torch.full((len(params), 1), float("-inf"), dtype=scaled.dtype, device=scaled.device)
    index = torch.tensor(rows, device=scaled.device)
    threshold[index] = _sorted_thresholds(scaled.index_select(0, index), weights.index_select(0, index),
                                          [top_k[row] for row in rows], [top_p[row] for row in rows], ws)
    return threshold


def _sorted_thresholds(scaled: torch.Tensor, weights: torch.Tensor, top_k: list[int], top_p: list[float],
                       ws: Workspace, candidates: int = 0) -> torch.Tensor:
    """``_thresholds`` for rows that each have top_k or top_p (top_k already 0 when off).

    Works on the C largest values of each row (``topk``), C = the largest top_k + 1 or
    NUCLEUS_CANDIDATES; rows whose top_p cut is not decided within them are redone with 16 times
    as many, up to a full sort (C > V / 4). Only values and sequential per-row sums decide, so the
    result does not depend on C."""
    device, vocab = scaled.device, scaled.shape[-1]
    candidates = max(candidates, max(top_k) + 1, NUCLEUS_CANDIDATES if 0 in top_k else 0)
    if 4 * candidates > vocab:
        candidates = vocab
        values, order = torch.sort(scaled, dim=-1, descending=True)
    else:
        values, order = torch.topk(scaled, candidates, dim=-1)
    k = torch.tensor([[value] for value in top_k], device=device)
    kth = values.gather(1, (k - 1).clamp(min=0)).masked_fill(k == 0, float("-inf"))
    nucleus = [row for row, p in enumerate(top_p) if p < 1.0]
    if not nucleus:
        return kth
    every = len(nucleus) == len(top_p)
    index = None if every else torch.tensor(nucleus, device=device)

    def pick(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if index is None else tensor.index_select(0, index)

    values_n, kth_n, k_n = pick(values), pick(kth), pick(k)
    # Weights of the candidates top_k keeps, in sorted order, and their running mass.
    sorted_weights = pick(weights).gather(1, pick(order)) * (values_n >= kth_n)
    mass = sorted_weights.cumsum(-1)
    # The mass top_k keeps: with top_k, all of it lies in the candidates (checked below); without,
    # it is the whole row, summed in token order (a sum that does not depend on C).
    total = mass[:, -1:]
    no_k = [row for row, n in enumerate(nucleus) if top_k[n] == 0]
    if no_k:
        rows = torch.tensor([nucleus[row] for row in no_k], device=device)
        row_weights = torch.index_select(weights, 0, rows, out=ws.get("row_mass", (len(no_k), vocab),
                                                                      weights.dtype, device))
        total = total.clone()
        total[torch.tensor(no_k, device=device)] = row_weights.cumsum_(-1)[:, -1:]
    p = torch.tensor([[top_p[row]] for row in nucleus], dtype=scaled.dtype, device=device)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    kept = (((mass - sorted_weights) / total) < p).sum(-1, keepdim=True).clamp(min=1)
    threshold_n = torch.maximum(kth_n, values_n.gather(1, kept - 1))
    if candidates < vocab:
        # Undecided: top_k's kept set may reach past the candidates (ties with the k-th value),
        # or, without top_k, every candidate is kept.
        undecided = torch.where(k_n > 0, values_n[:, -1:] >= kth_n, kept >= candidates)[:, 0]
        if bool(undecided.any()):
            redo = undecided.nonzero()[:, 0].tolist()
            rows_redo = [nucleus[row] for row in redo]
            index_redo = torch.tensor(rows_redo, device=device)
            threshold_n[torch.tensor(redo, device=device)] = _sorted_thresholds(
                scaled.index_select(0, index_redo), weights.index_select(0, index_redo),
                [top_k[row] for row in rows_redo], [top_p[row] for row in rows_redo], ws, candidates=16 * candidates)
    if index is None:
        return threshold_n
    threshold = kth.clone()
    threshold[index] = threshold_n
    return threshold


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


@dataclass
class _Entry:
    slot: int
    counted: int = 0  # tokens of seq.token_ids recorded
    columns: dict[int, int] = field(default_factory=dict)  # token id -> its column in the slot's row


class _TokenHistory:
    """The distinct tokens (prompt and output) of each sequence with a penalty, and how many times
    each occurs in the output: row ``slot`` of ``ids`` ([slots, width] int64; padding repeats the
    row's first token) and of ``counts`` ([slots, width] float32; padding 0). Updated from the
    tokens appended since the last lookup; both tensors grow by doubling, and are dropped when no
    sequence uses them."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self._entries: dict[int, _Entry] = {}
        self._free: list[int] = []  # slots below _num_slots that no sequence holds
        self._num_slots = 0

    def release(self, seq_id: int) -> None:
        entry = self._entries.pop(seq_id, None)
        if entry is not None:
            self._free.append(entry.slot)
            if not self._entries:
                self._reset()

    def lookup(self, seqs: list[Sequence], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Record the new tokens of ``seqs``; their rows' (ids, counts), [len(seqs), width used]."""
        if self.ids is not None and self.ids.device != torch.device(device):
            self._reset()
        starts, id_slots, id_columns, id_values, count_slots, count_columns = [], [], [], [], [], []
        slots = []
        for seq in seqs:
            entry = self._entries.get(seq.seq_id)
            tokens = seq.token_ids
            if entry is not None and entry.counted > len(tokens):  # tokens were taken back: recount
                self._free.append(entry.slot)
                entry = None
            if entry is None:
                entry = self._entries[seq.seq_id] = _Entry(self._take_slot())
                starts.append((entry.slot, tokens[0]))
            slot, columns = entry.slot, entry.columns
            num_prompt = seq.num_prompt_tokens
            for position in range(entry.counted, len(tokens)):
                token = tokens[position]
                column = columns.get(token)
                if column is None:
                    column = columns[token] = len(columns)
                    id_slots.append(slot)
                    id_columns.append(column)
                    id_values.append(token)
                if position >= num_prompt:
                    count_slots.append(slot)
                    count_columns.append(column)
            entry.counted = len(tokens)
            slots.append(slot)
        width = max(len(self._entries[seq.seq_id].columns) for seq in seqs)
        self._reserve(max(slots) + 1, width, device)
        assert self.ids is not None and self.counts is not None
        if starts:  # a new row: padding = its first token, no counts
            start_slots = torch.tensor([slot for slot, _ in starts], device=device)
            self.ids[start_slots] = torch.tensor([[token] for _, token in starts], device=device)
            self.counts[start_slots] = 0.0
        if id_values:
            self.ids[torch.tensor(id_slots, device=device), torch.tensor(id_columns, device=device)] = torch.tensor(
                id_values, device=device)
        if count_slots:
            index = (torch.tensor(count_slots, device=device), torch.tensor(count_columns, device=device))
            self.counts.index_put_(index, torch.ones(len(count_slots), device=device), accumulate=True)
        rows = torch.tensor(slots, device=device)
        return self.ids[:, :width].index_select(0, rows), self.counts[:, :width].index_select(0, rows)

    def _reset(self) -> None:
        self._entries.clear()
        self._free.clear()
        self._num_slots = 0
        self.ids = self.counts = None

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        self._num_slots += 1
        return self._num_slots - 1

    def _reserve(self, num_slots: int, width: int, device: torch.device) -> None:
        """Grow the tensors (by doubling) to hold ``num_slots`` rows of ``width`` columns."""
        if self.ids is not None and self.ids.shape[0] >= num_slots and self.ids.shape[1] >= width:
            return
        old_slots, old_width = (0, 0) if self.ids is None else self.ids.shape
        new_slots, new_width = max(old_slots, 8), max(old_width, 64)
        while new_slots < num_slots:
            new_slots *= 2
        while new_width < width:
            new_width *= 2
        ids = torch.zeros(new_slots, new_width, dtype=torch.long, device=device)
        counts = torch.zeros(new_slots, new_width, dtype=torch.float32, device=device)
        if self.ids is not None and self.counts is not None:
            ids[:old_slots, :old_width] = self.ids
            ids[:old_slots, old_width:] = self.ids[:, :1]  # padding repeats the first token
            counts[:old_slots, :old_width] = self.counts
        self.ids, self.counts = ids, counts

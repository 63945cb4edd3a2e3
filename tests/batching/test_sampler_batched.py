"""The batched sampler against a straightforward per-row reference (the per-row sampler it
replaced, with the same uniform per draw): penalties, logit_bias, filters, greedy rows and draws
on random logits in mixed batches; seeded rows whatever shares the batch; raw log-probabilities."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from batching import sampler as sampler_module
from batching.sampler import Sampler, draw, filter_logits, seeded_uniform
from batching.sequence import Sequence
from djl_like.protocol import GenerationParams


# --- the per-row reference -------------------------------------------------------------------


def ref_penalise(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """Repetition penalty over prompt and output (HF), presence/frequency over the output
    (OpenAI), then logit_bias; one row."""
    params, logits = seq.params, logits.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
        scores = logits[seen]
        logits[seen] = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and seq.num_output_tokens:
        ids, counts = torch.tensor(seq.output_token_ids).unique(return_counts=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        logits[list(ids)] += torch.tensor(biases, dtype=logits.dtype)
    return logits


def ref_filter(logits: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """top_k, then top_p (smallest prefix reaching top_p, the first token stays), then min_p."""
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def ref_token(logits: torch.Tensor, seq: Sequence) -> int:
    """One row: penalties, then argmax (greedy) or a draw with the row's seeded uniform."""
    logits = ref_penalise(logits, seq)
    if seq.params.is_greedy:
        return int(torch.argmax(logits))
    return ref_draw(logits, seq.params, seeded_uniform(seq.params.seed, seq.num_output_tokens))


def ref_draw(logits: torch.Tensor, params: GenerationParams, u: float) -> int:
    """The inverse CDF at ``u`` of the filtered distribution, in token-id order."""
    probs = torch.softmax(ref_filter(logits / params.temperature, params), dim=-1).double()
    cdf = probs.cumsum(0)
    return min(int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64), right=True)),
               logits.shape[-1] - 1)


# --- random mixed batches --------------------------------------------------------------------


def param_choices(vocab: int, seed: int | None = 7) -> list[GenerationParams]:
    sample = dict(do_sample=True, seed=seed)
    return [
        GenerationParams(),
        GenerationParams(repetition_penalty=1.3),
        GenerationParams(presence_penalty=0.5, frequency_penalty=0.3, logit_bias=((3, 5.0), (vocab - 1, -2.0))),
        GenerationParams(repetition_penalty=0.8, frequency_penalty=-0.5),
        GenerationParams(temperature=0.8, **sample),
        GenerationParams(temperature=1.2, top_k=5, **sample),
        GenerationParams(top_p=0.9, **sample),
        GenerationParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                         presence_penalty=0.5, **sample),
        GenerationParams(min_p=0.1, **sample),
        GenerationParams(temperature=1e-3, top_p=0.1, **sample),
        GenerationParams(top_k=vocab + 5, frequency_penalty=1.0, **sample),  # top_k >= V: off
        GenerationParams(top_k=1, temperature=0.5, logit_bias=((11, 3.0),), **sample),
        GenerationParams(temperature=1e-6, repetition_penalty=1.5, **sample),  # greedy: below the epsilon
        GenerationParams(top_k=300, top_p=0.95, **sample),
    ]


def make_seq(rng: random.Random, vocab: int, params: GenerationParams, num_prompt: int = 20,
             num_output: int = 15) -> Sequence:
    pool = [rng.randrange(vocab) for _ in range(12)]  # repeats: counts above 1
    seq = Sequence([rng.choice(pool) if rng.random() < 0.5 else rng.randrange(vocab) for _ in range(num_prompt)],
                   params)
    seq.token_ids.extend(rng.choice(pool) if rng.random() < 0.5 else rng.randrange(vocab) for _ in range(num_output))
    return seq


def random_batch(rng: random.Random, vocab: int, size: int, seed_base: int = 100) -> list[Sequence]:
    seqs = []
    for row in range(size):
        params = rng.choice(param_choices(vocab, seed=seed_base + row))
        seqs.append(make_seq(rng, vocab, params, num_prompt=rng.randrange(1, 40), num_output=rng.randrange(0, 30)))
    return seqs


@pytest.mark.parametrize("vocab,scale", [(1000, 3.0), (4096, 3.0), (4096, 0.3)])
def test_batched_tokens_equal_the_per_row_reference(vocab, scale):
    rng = random.Random(vocab)
    generator = torch.Generator().manual_seed(vocab)
    sampler = Sampler()
    for _ in range(4):
        seqs = random_batch(rng, vocab, 24)
        logits = torch.randn(len(seqs), vocab, generator=generator) * scale
        original = logits.clone()
        output = sampler.sample(logits, seqs)
        assert torch.equal(logits, original)  # the caller's logits are left alone
        assert output.token_ids == [ref_token(original[row], seq) for row, seq in enumerate(seqs)]


def test_penalties_equal_the_reference_as_tokens_are_appended():
    """The token histories kept between calls (incremental updates, slots reused after forget,
    rows and columns grown) give the penalties computed from scratch."""
    vocab, rng = 500, random.Random(3)
    generator = torch.Generator().manual_seed(3)
    sampler = Sampler()
    seqs = random_batch(rng, vocab, 6)
    for step in range(40):
        if step % 7 == 3:  # one finishes, two arrive
            sampler.forget(seqs.pop(rng.randrange(len(seqs))))
            seqs += random_batch(rng, vocab, 2, seed_base=step)
        logits = torch.randn(len(seqs), vocab, generator=generator) * 3
        expected = torch.stack([ref_penalise(logits[row], seq) for row, seq in enumerate(seqs)])
        assert torch.equal(sampler.penalise(logits.clone(), seqs), expected), step
        for seq in seqs:  # up to 3 tokens a step; long histories pass 64 distinct tokens
            seq.token_ids.extend(rng.randrange(vocab) for _ in range(rng.randrange(0, 4)))
    assert max(len(set(seq.token_ids)) for seq in seqs) > 64


def test_penalties_on_a_long_prompt_and_many_sequences():
    vocab, rng = 3000, random.Random(5)
    seqs = [make_seq(rng, vocab, GenerationParams(repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.2),
                     num_prompt=600, num_output=50) for _ in range(20)]
    logits = torch.randn(len(seqs), vocab, generator=torch.Generator().manual_seed(5))
    expected = torch.stack([ref_penalise(logits[row], seq) for row, seq in enumerate(seqs)])
    assert torch.equal(Sampler().penalise(logits.clone(), seqs), expected)


@pytest.mark.parametrize("vocab,scale", [(1000, 3.0), (4096, 3.0), (4096, 0.2)])
def test_batched_filters_equal_the_reference(vocab, scale):
    generator = torch.Generator().manual_seed(vocab)
    params = [p for p in param_choices(vocab) if not p.is_greedy] * 2
    logits = torch.randn(len(params), vocab, generator=generator) * scale
    kept = torch.isfinite(filter_logits(logits, params))
    expected = torch.stack([torch.isfinite(ref_filter(logits[row], p)) for row, p in enumerate(params)])
    assert torch.equal(kept, expected)


def test_draw_equals_the_reference_for_given_uniforms():
    vocab, rng = 2048, random.Random(11)
    generator = torch.Generator().manual_seed(11)
    params = [p for p in param_choices(vocab) if not p.is_greedy] * 3
    for _ in range(5):
        logits = torch.randn(len(params), vocab, generator=generator) * 2
        uniforms = [rng.random() for _ in params]
        tokens = draw(logits, params, uniforms).tolist()
        assert tokens == [ref_draw(logits[row], p, uniforms[row]) for row, p in enumerate(params)]
    # The edges of [0, 1): the first kept token, the last kept one; never a removed one.
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0, -1.0]] * 2)
    top2 = GenerationParams(do_sample=True, top_k=2)
    assert draw(logits, [top2, top2], [0.0, 1.0 - 2 ** -53]).tolist() == [1, 3]


def test_draws_follow_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05]))[None].repeat(1000, 1)
    params = [GenerationParams(do_sample=True)] * 1000
    tokens = draw(logits, params, [(i + 0.5) / 1000 for i in range(1000)]).tolist()
    assert [tokens.count(token) for token in range(5)] == [500, 0, 200, 250, 50]


def test_top_k_keeps_ties_and_top_p_keeps_ties_with_its_last_token():
    logits = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, 0.0])
    def kept(**kw) -> list[int]:
        return torch.isfinite(filter_logits(logits, GenerationParams(**kw))).nonzero().flatten().tolist()

    assert kept(top_k=2) == [0, 1, 2, 3]
    # p(3.0) = 0.39 < 0.5: the first 2.0 reaches it, and its ties stay (the order a sort gives
    # equal values never matters).
    assert kept(top_p=0.5) == [0, 1, 2, 3]
    assert kept(top_k=2, top_p=0.3) == [0]


def test_the_candidates_never_change_the_filters(monkeypatch):
    """topk over few candidates (redone with a full sort when the cut is not within them) keeps
    the same tokens as a full sort: ties past the candidates, nuclei larger than them."""
    vocab = 4096
    generator = torch.Generator().manual_seed(2)
    logits = (torch.randn(12, vocab, generator=generator) * 2).to(torch.bfloat16).float()  # many ties
    logits[0, :40] = 9.0  # top_k=5 with 40 ties at the k-th value
    logits[1, :] = 0.0  # top_p over a flat row: the nucleus is 90% of the vocabulary
    logits[1, 7] = 1.0
    params = [GenerationParams(do_sample=True, top_k=5, top_p=0.99), GenerationParams(do_sample=True, top_p=0.9)]
    params += [GenerationParams(do_sample=True, top_k=k, top_p=p) for k, p in
               [(0, 0.5), (0, 0.95), (3, 0.9), (20, 0.8), (100, 0.97), (7, 1.0), (0, 0.99), (50, 0.6)]]
    params += [GenerationParams(do_sample=True, min_p=0.3), GenerationParams(do_sample=True)]
    monkeypatch.setattr(sampler_module, "NUCLEUS_CANDIDATES", 8)
    small = filter_logits(logits, params)
    monkeypatch.setattr(sampler_module, "NUCLEUS_CANDIDATES", vocab)
    full = filter_logits(logits, params)
    assert torch.equal(torch.isfinite(small), torch.isfinite(full))
    assert int(torch.isfinite(small[0]).sum()) == 40
    assert int(torch.isfinite(small[1]).sum()) > 3000
    # Alone or next to rows that raise the number of candidates: the same tokens.
    for row in range(len(params)):
        assert torch.equal(filter_logits(logits[row:row + 1], params[row:row + 1]), small[row:row + 1]), row


# --- seeds ----------------------------------------------------------------------------------


def seeded_and_crowd(vocab: int, rng: random.Random) -> tuple[list[Sequence], list[int]]:
    """16 mixed rows; the seeded sampling ones are returned by index."""
    seqs = random_batch(rng, vocab, 16)
    sampling = [p for p in param_choices(vocab) if not p.is_greedy]
    for row in range(0, 15, 3):  # unseeded sampling rows, then seeded ones of each kind
        seqs[row] = make_seq(rng, vocab, GenerationParams(do_sample=True, top_k=rng.choice([0, 7, 400])))
        seqs[row + 1] = make_seq(rng, vocab, replace(sampling[row // 3], seed=1000 + row))
    seqs[15] = make_seq(rng, vocab, replace(sampling[-1], seed=5))
    seeded = [row for row, seq in enumerate(seqs) if not seq.params.is_greedy and seq.params.seed is not None]
    return seqs, seeded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seeded_rows_do_not_depend_on_the_batch(dtype):
    vocab, rng = 4096, random.Random(21)
    generator = torch.Generator().manual_seed(21)
    seqs, seeded = seeded_and_crowd(vocab, rng)
    assert len(seeded) >= 6
    twins = {row: Sequence(list(seqs[row].prompt_token_ids), seqs[row].params) for row in seeded}
    for row, twin in twins.items():
        twin.token_ids = list(seqs[row].token_ids)
    crowd, alone, other = Sampler(), Sampler(), Sampler()
    for _ in range(6):
        # bfloat16 logits (as a bf16 model gives) hold many ties.
        logits = (torch.randn(len(seqs), vocab, generator=generator) * 3).to(dtype).float()
        in_crowd = crowd.sample(logits, seqs).token_ids
        reversed_batch = other.sample(logits.flip(0), seqs[::-1]).token_ids[::-1]
        for row in seeded:
            by_itself = alone.sample(logits[row:row + 1], [twins[row]]).token_ids[0]
            assert in_crowd[row] == by_itself == reversed_batch[row]
            twins[row].token_ids.append(by_itself)
        for seq, token in zip(seqs, in_crowd):
            seq.token_ids.append(token)


def test_a_seed_gives_the_same_tokens_every_time_and_seeds_differ():
    vocab = 1000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(4)) * 0.5

    def run(seed: int | None) -> list[int]:
        seq, sampler = Sequence([1, 2, 3], GenerationParams(do_sample=True, seed=seed, top_p=0.95)), Sampler()
        for _ in range(20):
            seq.token_ids.append(sampler.sample(logits, [seq]).token_ids[0])
        return seq.output_token_ids

    assert run(42) == run(42)
    assert len({tuple(run(seed)) for seed in (42, 43, 44, 2**64 - 1)}) == 4  # choice i uses seed + i
    assert run(None) != run(None)


def test_a_retried_step_draws_the_same_token():
    """A seeded row's draw depends on its position, not on how often the sampler ran."""
    seq = Sequence([5, 6], GenerationParams(do_sample=True, seed=9))
    logits = torch.zeros(1, 300)
    sampler = Sampler()
    first = sampler.sample(logits, [seq]).token_ids
    assert sampler.sample(logits, [seq]).token_ids == first


# --- log-probabilities ------------------------------------------------------------------------


def test_log_probs_are_the_raw_log_softmax_whatever_the_processing():
    vocab, rng = 1000, random.Random(8)
    seqs = random_batch(rng, vocab, 16)
    for row in (0, 5, 9):
        seqs[row] = make_seq(rng, vocab, GenerationParams(logprobs=3, repetition_penalty=1.4, do_sample=row == 5,
                                                          top_k=4))
    logits = torch.randn(len(seqs), vocab, generator=torch.Generator().manual_seed(8)) * 3
    output = Sampler().sample(logits, seqs)
    raw = torch.log_softmax(logits, dim=-1)
    assert output.log_probs == raw.gather(1, torch.tensor(output.token_ids)[:, None])[:, 0].tolist()
    for row, top in enumerate(output.top_logprobs):
        if row in (0, 5, 9):
            values, ids = torch.topk(raw[row], 3)
            assert top == list(zip(ids.tolist(), values.tolist()))
        else:
            assert top is None


def test_an_all_greedy_batch_takes_the_fast_path(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the fast path processes nothing")

    sampler = Sampler()
    monkeypatch.setattr(sampler, "_sample_processed", fail)
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    seqs = [Sequence([1, 2], GenerationParams(temperature=0.5 if row % 2 else 1.0)) for row in range(8)]
    assert sampler.sample(logits, seqs).token_ids == torch.argmax(logits, dim=-1).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_greedy_batches_pick_torch_argmax_ties_and_infinities_included(dtype):
    """The all-greedy fast path (the compiled argmax on CPU where it builds): the first index of
    each row's maximum, as ``torch.argmax``, across chunk boundaries, ties and infinite logits;
    rows holding a NaN get torch's answer too."""
    rng = random.Random(5)
    vocab = 1100  # a ragged last chunk of the kernel's 512
    seqs = [make_seq(rng, vocab, GenerationParams(max_new_tokens=4)) for _ in range(7)]
    logits = torch.randn(7, vocab, generator=torch.Generator().manual_seed(6)).to(dtype)
    logits[1, 513] = logits[1, 1000] = 40  # a tie across chunks: the first wins
    logits[2, 1099] = 50  # the last element
    logits[3] = -float("inf")
    logits[3, 700] = 0
    logits[4, 3] = logits[4, 9] = float("inf")
    logits[5, 600] = float("nan")
    sampler = Sampler()
    out = sampler.sample(logits, seqs)
    from kernels import cpu_native

    assert bool(sampler._native) == (cpu_native.load() is not None)  # the compiled argmax served where built
    assert out.token_ids == torch.argmax(logits.float(), dim=-1).tolist()
    expected = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(out.log_probs), expected, equal_nan=True)


def _native_kernels():
    from kernels import cpu_native

    return cpu_native.load()


@pytest.mark.skipif(_native_kernels() is None, reason="the compiled CPU kernels do not build here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_greedy_batches_take_one_fused_pass_with_torchs_tokens_and_log_probs(monkeypatch, dtype):
    """All greedy, nothing to process, no top log-probabilities: the compiled ``greedy_rows``
    gives each row's token and log-probability on the logits as the model gave them (bf16 too),
    with no [rows, vocab] log_softmax; the same tokens as ``torch.argmax`` and the log-probability
    of ``log_softmax`` within float32 rounding."""
    rng = random.Random(7)
    vocab = 49152 + 37  # whole chunks and a ragged last one
    seqs = [make_seq(rng, vocab, GenerationParams(max_new_tokens=4, temperature=0.0 if row % 2 else 1.0))
            for row in range(6)]
    logits = (3 * torch.randn(6, vocab, generator=torch.Generator().manual_seed(8))).to(dtype)
    logits[1, 513] = logits[1, 40000] = 40  # a tie across chunks: the first wins
    logits[2, vocab - 1] = 50  # the last element
    logits[3, :30000] = -float("inf")  # masked tokens count for nothing
    logits[4] = 0.5  # a flat row: the first token, log(1 / vocab)
    calls = []
    native = _native_kernels()

    class Spy:
        def __getattr__(self, name):
            if name == "greedy_rows":
                calls.append(name)
            return getattr(native, name)

    sampler = Sampler()
    sampler._native = Spy()
    expected = torch.log_softmax(logits.float(), dim=-1)
    monkeypatch.setattr(torch, "log_softmax", lambda *a, **k: pytest.fail("the fused pass computes no log_softmax"))
    out = sampler.sample(logits, seqs)
    assert calls == ["greedy_rows"]
    assert out.token_ids == torch.argmax(logits.float(), dim=-1).tolist()
    assert out.token_ids[1] == 513 and out.token_ids[2] == vocab - 1 and out.token_ids[4] == 0
    chosen = expected.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(out.log_probs), chosen, rtol=1e-5, atol=1e-5)
    assert out.top_logprobs == [None] * 6


@pytest.mark.skipif(_native_kernels() is None, reason="the compiled CPU kernels do not build here")
def test_the_fused_greedy_pass_marks_rows_it_cannot_answer():
    logits = torch.randn(4, 1100, generator=torch.Generator().manual_seed(9))
    logits[0, 600] = float("nan")
    logits[1, 7] = float("inf")
    logits[2] = -float("inf")
    tokens, log_probs = _native_kernels().greedy_rows(logits)
    assert torch.isnan(log_probs[:3]).all() and not torch.isnan(log_probs[3])
    assert tokens[3] == torch.argmax(logits[3])

"""What a client receives: incremental text, stop conditions, finish reasons, log-probs."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from batching.detokenizer import IncrementalDetokenizer
from batching.offline import generate
from djl_like.protocol import FinishReason, GenerationParams
from tests.batching.fake_runner import scripted_engine

MULTIBYTE = "Größe 東京 🚀🦀 naïve façade — ½ ünïcödé ✨"


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def run(engine, prompt, **params):
    handle = engine.submit(prompt, GenerationParams(**params))
    engine.run_until_idle()
    return list(handle.outputs(timeout=0))


def test_multibyte_text_streams_in_whole_characters(tokenizer):
    ids = tokenizer.encode(MULTIBYTE)
    assert len(ids) > len(MULTIBYTE.split()), "the text must split characters across byte tokens"
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(token)[0] for token in ids] + [detok.flush()]
    assert "".join(pieces) == MULTIBYTE
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("strategy", ["dynamic", "rolling", "paged"])
def test_streamed_pieces_reassemble_to_the_generated_text(tokenizer, strategy):
    engine, runner = scripted_engine(tokenizer, {tokenizer.eos_token_id}, strategy)
    runner.script("hello", tokenizer.encode(MULTIBYTE))
    outputs = run(engine, "hello", max_new_tokens=len(tokenizer.encode(MULTIBYTE)))
    assert "".join(o.text for o in outputs) == MULTIBYTE
    assert outputs[-1].finish_reason is FinishReason.LENGTH
    assert all(o.finish_reason is None for o in outputs[:-1])


def test_stop_sequence_ends_generation_and_is_not_returned(tokenizer):
    engine, runner = scripted_engine(tokenizer, {tokenizer.eos_token_id})
    runner.script("q", tokenizer.encode("The answer is Paris.\nQuestion: next"))
    outputs = run(engine, "q", max_new_tokens=50, stop_sequences=("\nQuestion:",))
    assert "".join(o.text for o in outputs) == "The answer is Paris."
    assert outputs[-1].finish_reason is FinishReason.STOP_SEQUENCE
    # The stop text was never streamed, not even its first characters.
    assert "\n" not in "".join(o.text for o in outputs)


def test_earliest_of_several_stop_sequences_wins(tokenizer):
    engine, runner = scripted_engine(tokenizer, {tokenizer.eos_token_id})
    runner.script("q", tokenizer.encode("one, two, three, four"))
    outputs = run(engine, "q", max_new_tokens=50, stop_sequences=("four", ", three"))
    assert "".join(o.text for o in outputs) == "one, two"


def test_eos_finishes_with_eos_reason_and_no_text(tokenizer):
    eos = tokenizer.eos_token_id
    engine, runner = scripted_engine(tokenizer, {eos})
    runner.script("q", tokenizer.encode("Paris") + [eos])
    outputs = run(engine, "q", max_new_tokens=50)
    assert outputs[-1].finish_reason is FinishReason.EOS and outputs[-1].token_id == eos
    assert "".join(o.text for o in outputs) == "Paris"


def test_every_eos_id_of_the_generation_config_stops(tokenizer):
    other_eos = tokenizer.pad_token_id
    engine, runner = scripted_engine(tokenizer, {tokenizer.eos_token_id, other_eos})
    runner.script("q", tokenizer.encode("ab") + [other_eos])
    assert run(engine, "q", max_new_tokens=50)[-1].finish_reason is FinishReason.EOS


def test_ignore_eos_generates_exactly_max_new_tokens(tokenizer):
    eos = tokenizer.eos_token_id
    engine, runner = scripted_engine(tokenizer, {eos})
    runner.script("q", tokenizer.encode("ab") + [eos])
    outputs = run(engine, "q", max_new_tokens=12, ignore_eos=True)
    assert len(outputs) == 12 and outputs[-1].finish_reason is FinishReason.LENGTH


def test_last_output_reports_prompt_tokens_and_log_probs_are_probabilities(tokenizer):
    engine, runner = scripted_engine(tokenizer, {tokenizer.eos_token_id})
    runner.script("a longer prompt", tokenizer.encode("xyz"))
    outputs = run(engine, "a longer prompt", max_new_tokens=3)
    assert outputs[-1].num_prompt_tokens == len(tokenizer.encode("a longer prompt"))
    assert all(-1e-3 < o.log_prob <= 0.0 for o in outputs)


def test_abort_frees_the_sequence_and_ends_the_stream(tokenizer):
    engine, runner = scripted_engine(tokenizer, {tokenizer.eos_token_id}, "paged")
    runner.script("q", tokenizer.encode("abcdefgh"))
    handle = engine.submit("q", GenerationParams(max_new_tokens=200, ignore_eos=True))
    engine._drain_inbox()
    for _ in range(3):
        engine.step()
    handle.abort()
    engine._drain_inbox()
    assert engine.stats()["kv_tokens_reserved"] == 0 and engine.stats()["requests_finished"] == {"abort": 1}
    assert len(list(handle.outputs(timeout=0))) == 3


def test_real_model_stream_equals_tokenizer_decode(tiny_llama, tokenizer):
    from tests.batching.engine_helpers import make_engine

    engine = make_engine(tiny_llama, "paged", max_model_len=128, max_kv_cache_tokens=1024, block_size=8)
    prompts = ["東京 café", "The capital of France is", "🚀 naïve"]
    results = generate(engine, prompts, GenerationParams(max_new_tokens=40, ignore_eos=True))
    for result in results:
        ids = [t.token_id for t in result.tokens]
        assert result.text == tokenizer.decode(ids, skip_special_tokens=True)


class FailingRunner:
    """Wraps a scripted runner; any batch holding the prompt ``poison`` raises, like a model bug
    triggered by one request's input."""

    def __init__(self, inner, poison_ids):
        self.inner, self.poison_ids = inner, poison_ids
        self.tokenizer, self.eos_token_ids = inner.tokenizer, inner.eos_token_ids

    def execute(self, batch):
        if any(tuple(item.seq.prompt_token_ids) == self.poison_ids for item in batch.scheduled):
            raise RuntimeError("kernel failure")
        return self.inner.execute(batch)


def test_a_failing_request_does_not_fail_its_batch_neighbours(tokenizer):
    from djl_like.errors import ModelError

    engine, runner = scripted_engine(tokenizer, {tokenizer.eos_token_id}, "dynamic")
    runner.script("good", tokenizer.encode("fine answer"))
    engine.runner = FailingRunner(runner, tuple(tokenizer.encode("poison")))
    good = engine.submit("good", GenerationParams(max_new_tokens=len(tokenizer.encode("fine answer"))))
    bad = engine.submit("poison", GenerationParams(max_new_tokens=2))
    engine.run_until_idle()
    assert "".join(o.text for o in good.outputs(timeout=0)) == "fine answer"
    with pytest.raises(ModelError) as failure:
        list(bad.outputs(timeout=0))
    assert failure.value.status == 424 and "kernel failure" in failure.value.message
    assert engine.stats()["kv_tokens_reserved"] == 0 and engine.is_healthy


def test_engine_thread_serves_submissions_and_stays_healthy(tokenizer):
    engine, runner = scripted_engine(tokenizer, {tokenizer.eos_token_id}, "paged")
    runner.script("q", tokenizer.encode("threaded answer"))
    engine.start()
    try:
        handles = [engine.submit("q", GenerationParams(max_new_tokens=3)) for _ in range(4)]
        texts = ["".join(o.text for o in h.outputs(timeout=30)) for h in handles]
        assert texts == ["".join(tokenizer.decode(tokenizer.encode("threaded answer")[:3]))] * 4
        assert engine.is_healthy
    finally:
        engine.shutdown()
    assert not engine.is_healthy


def test_full_queue_refuses_with_503_until_a_request_finishes(tokenizer):
    from djl_like.errors import ServiceUnavailableError

    engine, runner = scripted_engine(tokenizer, {tokenizer.eos_token_id}, job_queue_size=2)
    runner.script("q", tokenizer.encode("ok"))
    first = engine.submit("q", GenerationParams(max_new_tokens=1))
    engine.submit("q", GenerationParams(max_new_tokens=1))
    with pytest.raises(ServiceUnavailableError) as refused:
        engine.submit("q", GenerationParams(max_new_tokens=1))
    assert refused.value.status == 503 and "2 requests" in refused.value.message
    engine.run_until_idle()
    assert list(first.outputs(timeout=0))[-1].finish_reason is FinishReason.LENGTH
    engine.submit("q", GenerationParams(max_new_tokens=1))  # room again

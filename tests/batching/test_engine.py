"""The engine under conditions clients cause: huge prompts, failures of one request, aborts,
shutdown; and the honesty of what it reports (statistics, log-probabilities)."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
from transformers import AutoTokenizer

from batching.engine import Engine
from batching.registry import batcher_class
from batching.scheduler import SchedulerConfig
from djl_like.errors import BadRequestError, InternalError, ModelError, ServiceUnavailableError
from djl_like.protocol import AbortReason, GenerationParams
from tests.batching.fake_runner import ScriptedRunner, scripted_engine
from tests.batching.test_outputs import FailingRunner


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def texts(handle, timeout=0):
    return "".join(output.text for output in handle.outputs(timeout=timeout))


# --- tokenization off the engine's path -----------------------------------------------------


def test_a_prompt_too_long_by_its_size_alone_is_refused_at_once(tokenizer):
    engine, _ = scripted_engine(tokenizer, {tokenizer.eos_token_id})
    prompt = "pages and more words " * 250_000  # 5 MB: seconds of tokenizing
    started = time.monotonic()
    with pytest.raises(BadRequestError) as refused:
        engine.submit(prompt, GenerationParams(max_new_tokens=10))
    assert time.monotonic() - started < 1.0
    assert f"prompt ({len(prompt)} characters, so at least" in refused.value.message
    assert "model length limit of 256 tokens" in refused.value.message


class SlowRunner(ScriptedRunner):
    """Takes 10 ms a step, like a small model: long enough to see a stream stall."""

    def execute(self, batch):
        time.sleep(0.01)
        return super().execute(batch)


def started_slow_engine(tokenizer):
    """A running engine over a SlowRunner that answers prompt "q" with "abcdefgh"."""
    runner = SlowRunner(tokenizer, {tokenizer.eos_token_id})
    engine, _ = scripted_engine(tokenizer, {tokenizer.eos_token_id})
    engine.runner = runner
    runner.script("q", tokenizer.encode("abcdefgh"))
    return engine.start()


def test_tokenizing_a_long_prompt_on_another_thread_does_not_stall_streams(tokenizer):
    engine = started_slow_engine(tokenizer)
    try:
        handle = engine.submit("q", GenerationParams(max_new_tokens=250, ignore_eos=True))
        outputs = handle.outputs(timeout=30)
        next(outputs)  # streaming
        window = {}

        def tokenize_like_an_http_thread():
            window["start"] = time.monotonic()
            engine.encode("pages and more words " * 60_000)  # ~1.3 MB: about a second of CPU
            window["end"] = time.monotonic()

        encoder = threading.Thread(target=tokenize_like_an_http_thread)
        encoder.start()
        arrivals = []
        for _ in outputs:
            arrivals.append(time.monotonic())
        encoder.join()
    finally:
        engine.shutdown()
    during = [t for t in arrivals if window["start"] <= t <= window["end"]]
    assert window["end"] - window["start"] > 0.3, "the prompt must take a while to tokenize"
    # A stalled engine emits nothing until the tokenizer lets go; a free one about one token
    # per step (10 ms).
    assert len(during) >= 0.2 * (window["end"] - window["start"]) / 0.01, (len(during), window)


# --- honest numbers ----------------------------------------------------------------------------


def test_tokens_generated_counts_only_sampled_tokens(tokenizer):
    runner = ScriptedRunner(tokenizer, {tokenizer.eos_token_id})
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=4, max_model_len=256,
                             num_blocks=64, block_size=8)
    engine = Engine(runner, batcher_class("paged")(config))
    prompt = "Continuous batching lets new requests join"
    assert len(tokenizer.encode(prompt)) > 8  # three or more prefill chunks sample nothing
    runner.script(prompt, tokenizer.encode("xyz"))
    handle = engine.submit(prompt, GenerationParams(max_new_tokens=3, ignore_eos=True))
    engine.run_until_idle()
    assert len(list(handle.outputs(timeout=0))) == 3
    stats = engine.stats()
    assert stats["steps"] > 3 + 2
    assert stats["tokens_generated"] == 3


class FixedLogitsRunner:
    """Returns the same logits for every sampling sequence."""

    def __init__(self, tokenizer, logits: torch.Tensor):
        self.tokenizer, self.eos_token_ids, self.logits = tokenizer, {tokenizer.eos_token_id}, logits

    def execute(self, batch):
        return self.logits.repeat(max(1, len(batch.sampling_sequences)), 1)


@pytest.mark.parametrize("params", [
    GenerationParams(max_new_tokens=2, do_sample=True, temperature=0.5, top_k=1, repetition_penalty=1.5,
                     presence_penalty=1.0, seed=3),
    GenerationParams(max_new_tokens=2, repetition_penalty=1.5),
    GenerationParams(max_new_tokens=2, do_sample=True, temperature=1e-3, top_p=0.1, min_p=0.5),
], ids=["sampled-top-k-1-with-penalties", "greedy-with-penalty", "tiny-temperature-filters"])
def test_log_prob_is_the_models_raw_log_probability(tokenizer, params):
    vocab = len(tokenizer)
    logits = torch.zeros(vocab)
    logits[5], logits[6], logits[7] = 4.0, 1.0, 0.5
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256, num_blocks=64, block_size=8)
    engine = Engine(FixedLogitsRunner(tokenizer, logits), batcher_class("paged")(config))
    handle = engine.submit([5, 9], params)  # token 5 is in the prompt: the repetition penalty hits it
    engine.run_until_idle()
    outputs = list(handle.outputs(timeout=0))
    # By hand: log softmax of the raw logits at the chosen token, whatever the penalties (5's
    # logit 4.0 becomes 2.67, then 1.67), temperature and filters (which make the draw certain) did.
    expected = 4.0 - math.log(math.exp(4.0) + math.exp(1.0) + math.exp(0.5) + (vocab - 3))
    assert [output.token_id for output in outputs] == [5, 5]
    assert [output.log_prob for output in outputs] == pytest.approx([expected] * 2, abs=1e-5)


def test_aborted_timed_out_and_failed_requests_are_counted_by_reason(tokenizer):
    engine, runner = scripted_engine(tokenizer, {tokenizer.eos_token_id}, "rolling")
    runner.script("good", tokenizer.encode("fine answer"))
    engine.runner = FailingRunner(runner, tuple(tokenizer.encode("poison")))
    params = GenerationParams(max_new_tokens=3, ignore_eos=True)
    gone, late, bad, fine = (engine.submit(prompt, params) for prompt in ("good", "good", "poison", "good"))
    gone.abort(AbortReason.CLIENT_DISCONNECTED)
    late.abort(AbortReason.TIMEOUT)
    engine.run_until_idle()
    fine.abort(AbortReason.CLIENT_DISCONNECTED)  # finished already: not an abort
    engine.run_until_idle()
    with pytest.raises(ModelError):
        list(bad.outputs(timeout=0))
    stats = engine.stats()
    assert stats["requests_finished"] == {"abort": 2, "error": 1, "length": 1}
    assert stats["requests_aborted"] == {"client_disconnected": 1, "timeout": 1}
    assert stats["requests_failed"] == {"ModelError": 1}


# --- failures of one request -----------------------------------------------------------------------


def test_a_failure_while_emitting_fails_only_that_request_and_repeats_no_step(tokenizer):
    engine, runner = scripted_engine(tokenizer, {tokenizer.eos_token_id}, "dynamic")
    script = tokenizer.encode("fine answer, all of it")
    runner.script("good", script)
    runner.script("bad", tokenizer.encode("doomed"))
    good = engine.submit("good", GenerationParams(max_new_tokens=len(script)))
    bad = engine.submit("bad", GenerationParams(max_new_tokens=5))
    engine._drain_inbox()
    detokenizer = engine._states[bad.request_id].detokenizer
    calls = []

    def add_then_break(token_id):
        calls.append(token_id)
        if len(calls) == 2:  # after advance(): the step's counters have moved
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a detokenizer bug")
        return type(detokenizer).add(detokenizer, token_id)

    detokenizer.add = add_then_break
    engine.run_until_idle()
    outputs = list(good.outputs(timeout=0))
    assert [output.token_id for output in outputs] == script  # nothing skipped or repeated
    assert "".join(output.text for output in outputs) == "fine answer, all of it"
    with pytest.raises(InternalError) as failure:
        list(bad.outputs(timeout=0))
    assert failure.value.status == 500 and "a detokenizer bug" in failure.value.message
    stats = engine.stats()
    assert stats["requests_failed"] == {"InternalServerError": 1}
    assert stats["kv_tokens_reserved"] == 0 and engine.is_healthy


def test_shutdown_fails_the_requests_still_running_with_503(tokenizer):
    engine = started_slow_engine(tokenizer)
    handle = engine.submit("q", GenerationParams(max_new_tokens=250, ignore_eos=True))
    outputs = handle.outputs(timeout=30)
    next(outputs)
    engine.shutdown()
    with pytest.raises(ServiceUnavailableError) as refused:
        list(handle.outputs(timeout=5))
    assert refused.value.status == 503 and "shut down" in refused.value.message
    assert engine.stats()["requests_aborted"] == {"shutdown": 1}
    assert engine.stats()["kv_tokens_reserved"] == 0


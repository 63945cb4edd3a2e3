"""The engine: owns the thread, the inbox of new requests and aborts, and the request handles.

One step is schedule -> execute -> sample -> postprocess -> emit. The HTTP server (through the
thread started by ``start()``) and the offline ``generate()`` drive the same ``step()``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from batching.detokenizer import IncrementalDetokenizer
from batching.prompt_bound import PromptSizeBound
from batching.runner import ModelRunner
from batching.sampler import Sampler
from batching.scheduler import Batcher, ScheduledSequence, SchedulerOutput
from batching.sequence import Sequence
from djl_like.errors import (BadRequestError, ConfigError, DeviceOutOfMemoryError, InternalError,
                             LmiError, ModelError, ServiceUnavailableError)
from djl_like.protocol import (AbortReason, FinishReason, GenerationParams, GenerationResult,
                               TokenOutput)

logger = logging.getLogger(__name__)
_request_ids = itertools.count()
_END = object()


class RequestHandle:
    """What a caller gets back from ``submit``: iterate it for ``TokenOutput``s (the last one has
    ``finish_reason``), or call ``result()``. ``abort()`` frees the sequence within a step.
    Iteration raises the request's ``LmiError`` if the engine failed it."""

    def __init__(self, engine: "Engine", request_id: str, prompt: str, num_prompt_tokens: int):
        self.engine = engine
        self.request_id = request_id
        self.prompt = prompt
        self.num_prompt_tokens = num_prompt_tokens
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()
        self.finished = False

    def put(self, item) -> None:
        self._outputs.put(item)

    def __iter__(self):
        return self.outputs()

    def outputs(self, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            item = self._outputs.get(timeout=remaining)  # raises queue.Empty on timeout
            if isinstance(item, LmiError):
                self.finished = True
                raise item
            if item is _END:
                self.finished = True
                return
            if item.finish_reason is not None:
                self.finished = True
            yield item

    def result(self, timeout: float | None = None) -> GenerationResult:
        return GenerationResult(prompt=self.prompt, tokens=list(self.outputs(timeout)))

    def abort(self, reason: AbortReason = AbortReason.CANCELLED) -> None:
        """Cancel the request (a no-op once it finished); ``reason`` is counted in the stats."""
        if not self.finished:
            self.engine.abort(self.request_id, reason)


@dataclass
class _RequestState:
    seq: Sequence
    handle: RequestHandle
    detokenizer: IncrementalDetokenizer


@dataclass
class _Sampled:
    """What one forward pass produced: a token and its log-probability per sampling sequence."""

    seqs: list[Sequence]
    tokens: list[int]
    log_probs: list[float]


@dataclass
class EngineCounters:
    steps: int = 0
    tokens_generated: int = 0  # sampled tokens only
    tokens_computed: int = 0  # every token through the model: prompts, decodes, recomputation
    finished: Counter = field(default_factory=Counter)  # by FinishReason
    aborted: Counter = field(default_factory=Counter)  # by AbortReason
    failed: Counter = field(default_factory=Counter)  # by the error's type (ModelError ...)
    batch_size_histogram: Counter = field(default_factory=Counter)
    max_batch_size: int = 0


class Engine:
    """Drives one batcher over one model runner."""

    def __init__(self, runner: ModelRunner, batcher: Batcher, *, job_queue_size: int = 1000):
        self.runner = runner
        self.batcher = batcher
        self.sampler = Sampler()
        self.tokenizer = runner.tokenizer
        self._backend_tokenizer = _backend_tokenizer(runner.tokenizer)
        self._prompt_bound = PromptSizeBound.of(self._backend_tokenizer)
        self.eos_token_ids = runner.eos_token_ids
        self.job_queue_size = job_queue_size
        self.counters = EngineCounters()
        self._states: dict[str, _RequestState] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._num_pending = 0  # submitted and not finished: guarded by _lock
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None

    # ---- submission (any thread) ---------------------------------------------------------
    def submit(self, prompt: str | list[int], params: GenerationParams, request_id: str | None = None,
               *, add_special_tokens: bool = True) -> RequestHandle:
        """Tokenize, validate against the model and KV limits, and queue. Never blocks on the model.
        Raises BadRequestError (does not fit) or ServiceUnavailableError (queue full, engine dead).
        ``add_special_tokens=False`` for text a chat template rendered (it wrote BOS itself)."""
        if not self.is_healthy:
            raise ServiceUnavailableError("the engine is not running")
        if isinstance(prompt, str):
            self._refuse_by_size(prompt, params)
            token_ids = self.encode(prompt, add_special_tokens)
        else:
            token_ids = list(prompt)
        if not token_ids:
            raise BadRequestError("the prompt encodes to no tokens")
        seq = Sequence(token_ids, params, request_id or f"req-{next(_request_ids)}")
        self.batcher.check_fits(seq)
        with self._lock:
            if self._num_pending >= self.job_queue_size:
                raise ServiceUnavailableError(f"the request queue is full ({self.job_queue_size} requests)")
            self._num_pending += 1
        text = prompt if isinstance(prompt, str) else ""
        handle = RequestHandle(self, seq.request_id, text, len(token_ids))
        detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop_sequences)
        self._inbox.put(("add", _RequestState(seq, handle, detokenizer)))
        self._wakeup.set()
        return handle

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; safe from any thread, and never in the engine thread's way.

        NOTE: ``encode_batch`` releases the GIL while the Rust tokenizer works (``encode`` holds
        it: seconds for a long prompt, freezing every stream), and the tokenizer is only ever
        read, by any thread, so no lock is needed.
        """
        return self._backend_tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def _refuse_by_size(self, prompt: str, params: GenerationParams) -> None:
        """Refuse, without tokenizing it, a prompt whose length in characters alone proves it
        cannot fit the model (tokenizing megabytes costs seconds of CPU)."""
        num_tokens = self._prompt_bound.min_tokens(prompt)
        max_model_len = self.batcher.config.max_model_len
        if num_tokens + params.max_new_tokens > max_model_len:
            raise BadRequestError(
                f"prompt ({len(prompt)} characters, so at least {num_tokens} tokens) + max_new_tokens "
                f"({params.max_new_tokens}) exceeds the model length limit of {max_model_len} tokens")

    def abort(self, request_id: str, reason: AbortReason = AbortReason.CANCELLED) -> None:
        self._inbox.put(("abort", (request_id, reason)))
        self._wakeup.set()

    # ---- the thread --------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop the thread after its current step; requests still in the engine then fail with
        ServiceUnavailableError (their clients get a 503 or a last error frame)."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive() or self.error is not None:
                return  # a step is stuck, or the loop broke: its state cannot be trusted
        self._drain_inbox()
        self._end_all(ServiceUnavailableError("the server shut down before this request finished"),
                      AbortReason.SHUTDOWN)

    @property
    def is_running(self) -> bool:
        """True when the engine thread drives the steps (``start()`` was called)."""
        return self._thread is not None

    @property
    def is_healthy(self) -> bool:
        if self._stopping or self.error is not None:
            return False
        return self._thread is None or self._thread.is_alive()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wait_for_work()
                self._drain_inbox()
                self.step()
        except BaseException as exc:  # the loop itself broke: /ping turns 503, requests fail
            logger.exception("engine thread died")
            self.error = exc
            error = ServiceUnavailableError(f"the engine stopped: {exc}")
            for state in list(self._states.values()):  # NOTE: the batcher may be broken: no freeing
                self.counters.failed[error.kind] += 1
                state.handle.put(error)

    def _wait_for_work(self) -> None:
        delay = self.batcher.seconds_until_ready()
        if delay == 0.0 or not self._inbox.empty():
            return
        self._wakeup.wait(timeout=delay if delay is not None else 1.0)
        self._wakeup.clear()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._states[payload.seq.request_id] = payload
                self.batcher.add(payload.seq)
            else:
                self._abort(*payload)

    def _abort(self, request_id: str, reason: AbortReason) -> None:
        state = self._states.get(request_id)
        if state is not None:  # not finished meanwhile
            self.counters.aborted[reason.value] += 1
            self._finish(state, FinishReason.ABORT)

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> None:
        """schedule -> execute -> sample -> postprocess -> emit."""
        batch = self.batcher.schedule()
        if batch.is_empty:
            return
        try:
            sampled = self._forward(batch)
        except Exception:  # noqa: BLE001 - find the request that broke the batch, spare the rest
            logger.exception("step failed for %d sequences; retrying them one by one", len(batch.scheduled))
            for item in batch.scheduled:
                self._run_alone(item)
            return
        self._commit(batch, sampled)

    def _forward(self, batch: SchedulerOutput) -> _Sampled:
        """Run the model and sample. Changes no sequence, so a failed batch can be retried."""
        sampling = batch.sampling_sequences
        logits = self.runner.execute(batch)
        if not sampling:  # every member is a prefill chunk that ends short of its last token
            return _Sampled([], [], [])
        tokens, log_probs = self.sampler.sample(logits[:len(sampling)], sampling)
        return _Sampled(sampling, tokens, log_probs)

    def _commit(self, batch: SchedulerOutput, sampled: _Sampled) -> None:
        """Move the counters, then emit each new token. A failure while emitting one request's
        token fails that request only: the step is never run again."""
        self.batcher.advance(batch, sampled.tokens)
        self._record(batch, len(sampled.tokens))
        for seq, token, log_prob in zip(sampled.seqs, sampled.tokens, sampled.log_probs):
            state = self._states[seq.request_id]
            try:
                self._postprocess(state, token, log_prob)
            except Exception as exc:  # noqa: BLE001 - the failure belongs to this request only
                logger.exception("post-processing request %s failed", seq.request_id)
                self._fail(state, InternalError(
                    f"the server failed on this request: {type(exc).__name__}: {exc}"))

    def _run_alone(self, item: ScheduledSequence) -> None:
        """Re-run one member of a failed batch; if it fails alone, only its request fails."""
        if item.seq.is_finished:
            return
        alone = SchedulerOutput([item])
        try:
            sampled = self._forward(alone)
        except Exception as exc:  # noqa: BLE001 - the failure belongs to this request only
            logger.exception("request %s failed", item.seq.request_id)
            error_type = DeviceOutOfMemoryError if isinstance(exc, torch.OutOfMemoryError) else ModelError
            error = error_type(f"the model failed on this request: {type(exc).__name__}: {exc}")
            self._fail(self._states[item.seq.request_id], error)
            return
        self._commit(alone, sampled)

    def _postprocess(self, state: _RequestState, token: int, log_prob: float) -> None:
        """Detokenize, check the stop conditions, emit, and free the sequence when it is done."""
        seq, params = state.seq, state.seq.params
        text, hit_stop = state.detokenizer.add(token)
        reason = None
        if hit_stop:
            reason = FinishReason.STOP_SEQUENCE
        elif token in self.eos_token_ids and not params.ignore_eos:
            reason = FinishReason.EOS
        elif seq.num_output_tokens >= params.max_new_tokens:
            reason = FinishReason.LENGTH
        if reason is not None and reason is not FinishReason.STOP_SEQUENCE:
            text += state.detokenizer.flush()
        final = reason is not None
        state.handle.put(TokenOutput(token, text, log_prob, reason, seq.num_prompt_tokens if final else None))
        if final:
            self._finish(state, reason)

    def _finish(self, state: _RequestState, reason: FinishReason, error: LmiError | None = None) -> None:
        """Free the sequence once; an aborted or failed handle gets its end marker or its error."""
        if self._states.pop(state.seq.request_id, None) is None:
            return  # finished already (a failure while emitting its last token)
        self.batcher.finish(state.seq, reason)
        self.sampler.forget(state.seq)
        self.counters.finished[reason.value] += 1
        if error is not None:
            state.handle.put(error)
        elif reason is FinishReason.ABORT:
            state.handle.put(_END)
        with self._lock:
            self._num_pending -= 1

    def _fail(self, state: _RequestState, error: LmiError) -> None:
        self.counters.failed[error.kind] += 1
        self._finish(state, FinishReason.ERROR, error)

    def _end_all(self, error: LmiError, reason: AbortReason) -> None:
        """Abort every request still in the engine; each handle gets ``error``."""
        for state in list(self._states.values()):
            self.counters.aborted[reason.value] += 1
            self._finish(state, FinishReason.ABORT, error)

    def _record(self, batch: SchedulerOutput, num_sampled: int) -> None:
        counters = self.counters
        counters.steps += 1
        counters.tokens_generated += num_sampled
        counters.tokens_computed += batch.num_batched_tokens
        size = len(batch.scheduled)
        counters.batch_size_histogram[size] += 1
        counters.max_batch_size = max(counters.max_batch_size, size)

    # ---- offline use and statistics ---------------------------------------------------------------
    def run_until_idle(self) -> None:
        """Synchronous driving (no thread): process the inbox and step until nothing is left."""
        self._drain_inbox()
        while self.batcher.has_unfinished:
            delay = self.batcher.seconds_until_ready()
            if delay:
                time.sleep(delay)
            self.step()
            self._drain_inbox()

    def stats(self) -> dict:
        counters = self.counters
        return {
            **self.batcher.stats(),
            "healthy": self.is_healthy,
            "steps": counters.steps,
            "tokens_generated": counters.tokens_generated,
            "tokens_computed": counters.tokens_computed,
            "requests_finished": dict(counters.finished),
            "requests_aborted": dict(counters.aborted),
            "requests_failed": dict(counters.failed),
            "max_batch_size": counters.max_batch_size,
            "batch_size_histogram": {str(k): v for k, v in sorted(counters.batch_size_histogram.items())},
        }


def _backend_tokenizer(tokenizer):
    """The Rust ``tokenizers.Tokenizer`` behind a fast Hugging Face tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"the model's tokenizer ({type(tokenizer).__name__}) is not a fast "
                          "(tokenizers-backed) tokenizer, which serving needs; add a tokenizer.json")
    return backend

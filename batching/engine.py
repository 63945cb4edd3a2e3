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
from batching.runner import ModelRunner
from batching.sampler import Sampler
from batching.scheduler import Batcher, ScheduledSequence, SchedulerOutput
from batching.sequence import Sequence
from djl_like.errors import (BadRequestError, DeviceOutOfMemoryError, LmiError, ModelError,
                             ServiceUnavailableError)
from djl_like.protocol import FinishReason, GenerationParams, GenerationResult, TokenOutput

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

    def abort(self) -> None:
        if not self.finished:
            self.engine.abort(self.request_id)


@dataclass
class _RequestState:
    seq: Sequence
    handle: RequestHandle
    detokenizer: IncrementalDetokenizer


@dataclass
class EngineCounters:
    steps: int = 0
    tokens_generated: int = 0
    tokens_computed: int = 0  # every token through the model: prompts, decodes, recomputation
    finished: Counter = field(default_factory=Counter)
    batch_size_histogram: Counter = field(default_factory=Counter)
    max_batch_size: int = 0


class Engine:
    """Drives one batcher over one model runner."""

    def __init__(self, runner: ModelRunner, batcher: Batcher, *, job_queue_size: int = 1000):
        self.runner = runner
        self.batcher = batcher
        self.sampler = Sampler()
        self.tokenizer = runner.tokenizer
        self.eos_token_ids = runner.eos_token_ids
        self.job_queue_size = job_queue_size
        self.counters = EngineCounters()
        self._states: dict[str, _RequestState] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._num_pending = 0  # submitted and not finished: guarded by _lock
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None

    # ---- submission (any thread) ---------------------------------------------------------
    def submit(self, prompt: str | list[int], params: GenerationParams, request_id: str | None = None) -> RequestHandle:
        """Tokenize, validate against the model and KV limits, and queue. Never blocks on the model.
        Raises BadRequestError (does not fit) or ServiceUnavailableError (queue full, engine dead)."""
        if not self.is_healthy:
            raise ServiceUnavailableError("the engine is not running")
        token_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
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
        self._inbox.put(("add", _RequestState(seq, handle, IncrementalDetokenizer(self.tokenizer, params.stop_sequences, self._tokenizer_lock))))
        self._wakeup.set()
        return handle

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; safe from any thread. ``add_special_tokens=False`` for text a
        chat template rendered (it wrote BOS itself)."""
        # NOTE: HTTP threads encode while the engine thread decodes; the Rust tokenizer can raise
        # "Already borrowed" under concurrent use, so calls are serialised (they take microseconds).
        with self._tokenizer_lock:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    # ---- the thread --------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

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
            self._fail_all(ServiceUnavailableError(f"the engine stopped: {exc}"))

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
            elif payload in self._states:
                self._finish(self._states[payload], FinishReason.ABORT)

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> None:
        """schedule -> execute -> sample -> postprocess -> emit."""
        batch = self.batcher.schedule()
        if batch.is_empty:
            return
        try:
            self._execute(batch)
        except Exception:  # noqa: BLE001 - find the request that broke the batch, spare the rest
            logger.exception("step failed for %d sequences; retrying them one by one", len(batch.scheduled))
            for item in batch.scheduled:
                self._run_alone(item)

    def _execute(self, batch: SchedulerOutput) -> None:
        sampling = batch.sampling_sequences
        logits = self.runner.execute(batch)
        tokens, log_probs = self.sampler.sample(logits, sampling)
        self.batcher.advance(batch, tokens)
        self._record(batch, len(tokens))
        for seq, token, log_prob in zip(sampling, tokens, log_probs):
            self._postprocess(self._states[seq.request_id], token, log_prob)

    def _run_alone(self, item: ScheduledSequence) -> None:
        """Re-run one member of a failed batch; if it fails alone, only its request fails."""
        if item.seq.is_finished:
            return
        try:
            self._execute(SchedulerOutput([item]))
        except Exception as exc:  # noqa: BLE001 - the failure belongs to this request only
            logger.exception("request %s failed", item.seq.request_id)
            error_type = DeviceOutOfMemoryError if isinstance(exc, torch.OutOfMemoryError) else ModelError
            error = error_type(f"the model failed on this request: {type(exc).__name__}: {exc}")
            self._finish(self._states[item.seq.request_id], FinishReason.ABORT, error)

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
        """Free the sequence; an aborted or failed handle gets its end marker or its error."""
        self.batcher.finish(state.seq, reason)
        self.sampler.forget(state.seq)
        del self._states[state.seq.request_id]
        self.counters.finished[reason.value] += 1
        if error is not None:
            state.handle.put(error)
        elif reason is FinishReason.ABORT:
            state.handle.put(_END)
        with self._lock:
            self._num_pending -= 1

    def _fail_all(self, error: LmiError) -> None:
        for state in list(self._states.values()):
            state.handle.put(error)

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
            "max_batch_size": counters.max_batch_size,
            "batch_size_histogram": {str(k): v for k, v in sorted(counters.batch_size_histogram.items())},
        }

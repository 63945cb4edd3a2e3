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
from batching.inbox import EngineThread
from batching.prompt_bound import PromptSizeBound
from batching.runner import ModelRunner
from batching.sampler import Sampler, SamplerOutput
from batching.scheduler import Batcher, ScheduledSequence, SchedulerOutput
from batching.sequence import Sequence
from djl_like.errors import (BadRequestError, ConfigError, DeviceOutOfMemoryError, InternalError,
                             LmiError, ModelError, ServiceUnavailableError)
from djl_like.protocol import (AbortReason, FinishReason, GenerationParams, GenerationResult,
                               TokenLogProb, TokenOutput)

logger = logging.getLogger(__name__)
_request_ids = itertools.count()
_END = object()


class RequestHandle:
    """What a caller gets back from ``submit``: iterate it for ``TokenOutput``s (the last one has
    ``finish_reason``), or call ``result()``. ``abort()`` frees the sequence within a step.
    Iteration raises the request's ``LmiError`` if the engine failed it."""

    def __init__(self, engine: "Engine", request_id: str, prompt: str, num_prompt_tokens: int,
                 group: "HandleGroup | None" = None):
        self.engine = engine
        self.request_id = request_id
        self.prompt = prompt
        self.num_prompt_tokens = num_prompt_tokens
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()
        self.finished = False
        self._group = group
        self.index = group.join(self) if group is not None else 0

    def put(self, item) -> None:
        """Called by the engine thread: a ``TokenOutput``, an ``LmiError``, or the end marker."""
        if self._group is not None:
            self._group.put(self.index, item)
        else:
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


class HandleGroup:
    """The handles of one client request that several sequences answer (OpenAI's ``n`` choices,
    the prompts of a completions list), read as one stream of ``(index, TokenOutput)`` in the
    order the engine emits them; ``index`` is the handle's place in ``handles``.

    Pass it to ``Engine.submit`` / ``submit_choices`` before anything is emitted. Iteration
    raises the first ``LmiError`` a member gets; ``abort()`` cancels every member still running.
    """

    def __init__(self) -> None:
        self.handles: list[RequestHandle] = []
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()

    def join(self, handle: RequestHandle) -> int:
        self.handles.append(handle)
        return len(self.handles) - 1

    def put(self, index: int, item) -> None:
        self._outputs.put((index, item))

    @property
    def finished(self) -> bool:
        return all(handle.finished for handle in self.handles)

    def outputs(self, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            index, item = self._outputs.get(timeout=remaining)  # raises queue.Empty on timeout
            handle = self.handles[index]
            if isinstance(item, LmiError):
                handle.finished = True
                raise item
            if item is _END:
                handle.finished = True
                continue
            if item.finish_reason is not None:
                handle.finished = True
            yield index, item

    def abort(self, reason: AbortReason = AbortReason.CANCELLED) -> None:
        for handle in self.handles:
            handle.abort(reason)


@dataclass(frozen=True)
class StepReport:
    """The engine's state after a loop iteration; totals count since the engine started."""

    num_running: int
    num_waiting: int
    num_blocks: int
    num_blocks_used: int
    num_blocks_free: int
    num_blocks_cached: int
    num_preemptions_total: int
    num_generation_tokens_total: int
    # Prompt tokens looked up in the prefix cache at admission, and those found (full blocks).
    num_prefix_query_tokens_total: int
    num_prefix_hit_tokens_total: int


@dataclass(frozen=True)
class RequestReport:
    """One request, reported when its first token is emitted and again when it finishes.

    Times are seconds; ``None`` where the request never got that far. ``cause`` is the abort
    reason (``client_disconnected`` ...) or the error type (``ModelError`` ...).
    """

    num_prompt_tokens: int
    num_output_tokens: int
    queue_s: float | None
    time_to_first_token_s: float | None
    finish_reason: FinishReason | None = None
    cause: str | None = None
    e2e_latency_s: float | None = None
    time_per_output_token_s: float | None = None


class EngineObserver:
    """Told what the engine did, from the engine thread (``container.metrics`` exports it to
    Prometheus). This base ignores everything: offline use records no metrics. A failing hook
    is logged and never stops the engine."""

    def on_step(self, report: StepReport) -> None:
        """After every iteration of the engine loop, busy or idle."""

    def on_first_token(self, report: RequestReport) -> None:
        """When a request's first token is emitted."""

    def on_request_finished(self, report: RequestReport) -> None:
        """When a request ends for any reason (finished, aborted, failed)."""


@dataclass
class _RequestState:
    seq: Sequence
    handle: RequestHandle
    detokenizer: IncrementalDetokenizer
    scheduled_at: float | None = None  # first time the batcher scheduled it
    first_token_at: float | None = None
    # A later choice of an ``n > 1`` request, kept out of the batcher until the first choice has
    # computed the prompt (see ``Engine.submit_choices``).
    held: bool = False


@dataclass
class _Sampled:
    """What one forward pass produced for the sampling sequences."""

    seqs: list[Sequence]
    output: SamplerOutput


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


class Engine(EngineThread):
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
        self.observer = EngineObserver()  # replace before start() to record metrics
        self._states: dict[str, _RequestState] = {}
        # Later choices of n > 1 requests, by the request id of the choice computing the prompt.
        self._held: dict[str, list[_RequestState]] = {}
        self._token_texts: dict[int, str] = {}  # engine thread only
        self._init_thread()
        self._num_pending = 0  # submitted and not finished: guarded by _lock
        self._lock = threading.Lock()

    # ---- submission (any thread) ---------------------------------------------------------
    def submit(self, prompt: str | list[int], params: GenerationParams, request_id: str | None = None,
               *, add_special_tokens: bool = True, group: HandleGroup | None = None) -> RequestHandle:
        """Tokenize, validate against the model and KV limits, and queue. Never blocks on the model.
        Raises BadRequestError (does not fit) or ServiceUnavailableError (queue full, engine dead).
        ``add_special_tokens=False`` for text a chat template rendered (it wrote BOS itself);
        ``group`` collects this handle's outputs with others (see ``HandleGroup``)."""
        return self.submit_choices(prompt, [params], request_id, add_special_tokens=add_special_tokens,
                                   group=group)[0]

    def submit_choices(self, prompt: str | list[int], choices: list[GenerationParams], request_id: str | None = None,
                       *, add_special_tokens: bool = True, group: HandleGroup | None = None) -> list[RequestHandle]:
        """Several sequences continuing one prompt (OpenAI's ``n``), one per entry of ``choices``
        (they differ at most in their seed): tokenized and checked once, one handle each.

        NOTE: with prefix caching, the first choice computes the prompt alone and the others join
        the batcher once it has: they take its blocks from the cache and compute at most the last,
        partly filled block. Admitted together, each would compute the whole prompt, because a
        block is registered in the cache only after the step that fills it.
        """
        if not self.is_healthy:
            raise ServiceUnavailableError("the engine is not running")
        params = choices[0]
        token_ids = self._prompt_token_ids(prompt, params, add_special_tokens)
        base_id = request_id or f"req-{next(_request_ids)}"
        seqs = [Sequence(token_ids, choice, base_id if len(choices) == 1 else f"{base_id}-{index}")
                for index, choice in enumerate(choices)]
        self.batcher.check_fits(seqs[0])
        with self._lock:
            if self._num_pending + len(seqs) > self.job_queue_size:
                raise ServiceUnavailableError(f"the request queue is full ({self.job_queue_size} requests)")
            self._num_pending += len(seqs)
        text = prompt if isinstance(prompt, str) else ""
        states = [_RequestState(seq, RequestHandle(self, seq.request_id, text, len(token_ids), group),
                                IncrementalDetokenizer(self.tokenizer, seq.params.stop_sequences))
                  for seq in seqs]
        self._inbox.post("add", states)
        return [state.handle for state in states]

    def _prompt_token_ids(self, prompt: str | list[int], params: GenerationParams,
                          add_special_tokens: bool) -> list[int]:
        vocab_size = len(self.tokenizer)
        if isinstance(prompt, str):
            self._refuse_by_size(prompt, params)
            token_ids = self.encode(prompt, add_special_tokens)
        else:
            token_ids = list(prompt)
            if any(not 0 <= token_id < vocab_size for token_id in token_ids):
                raise BadRequestError(f"prompt: token ids must be from 0 to {vocab_size - 1}")
        if not token_ids:
            raise BadRequestError("the prompt encodes to no tokens")
        for token_id, _ in params.logit_bias:
            if token_id >= vocab_size:
                raise BadRequestError(f"logit_bias: token id {token_id} is outside the vocabulary "
                                      f"(0 to {vocab_size - 1})")
        return token_ids

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
        self._inbox.post("abort", (request_id, reason))

    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt + output tokens) this engine serves."""
        return self.batcher.config.max_model_len

    # ---- the thread --------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the thread after its current step; requests still in the engine then fail with
        ServiceUnavailableError (their clients get a 503 or a last error frame)."""
        if not self._stop_thread() or self.error is not None:
            return  # a step is stuck, or the loop broke: its state cannot be trusted
        self._drain_inbox()
        self._end_all(ServiceUnavailableError("the server shut down before this request finished"),
                      AbortReason.SHUTDOWN)

    def _after_step(self) -> None:
        self._notify(self.observer.on_step, self._step_report())

    def _on_crash(self, exc: BaseException) -> None:
        error = ServiceUnavailableError(f"the engine stopped: {exc}")
        for state in list(self._states.values()):  # NOTE: the batcher may be broken: no freeing
            self.counters.failed[error.kind] += 1
            state.handle.put(error)

    def _drain_inbox(self) -> None:
        for kind, payload in self._inbox.drain():
            if kind == "add":
                self._add(*payload)
            else:
                self._abort(*payload)

    def _add(self, first: _RequestState, *others: _RequestState) -> None:
        """Hand a request's sequences to the batcher; with prefix caching, the later choices of
        an n > 1 request wait until the first has computed the prompt (``submit_choices``)."""
        hold = bool(others) and self.batcher.block_manager.enable_prefix_caching
        for state in (first, *others):
            self._states[state.seq.request_id] = state
            state.held = hold and state is not first
            if not state.held:
                self.batcher.add(state.seq)
        if hold:
            self._held[first.seq.request_id] = list(others)

    def _release_held(self, request_id: str) -> None:
        """The choice ``request_id`` has computed the prompt (or ended): its siblings may run."""
        for state in self._held.pop(request_id, ()):
            if state.held and state.seq.request_id in self._states:
                state.held = False
                self.batcher.add(state.seq)

    def _abort(self, request_id: str, reason: AbortReason) -> None:
        state = self._states.get(request_id)
        if state is not None:  # not finished meanwhile
            self.counters.aborted[reason.value] += 1
            self._finish(state, FinishReason.ABORT, cause=reason.value)

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> None:
        """schedule -> execute -> sample -> postprocess -> emit."""
        batch = self.batcher.schedule()
        if batch.is_empty:
            return
        self._mark_scheduled(batch)
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
            return _Sampled([], SamplerOutput([], [], []))
        return _Sampled(sampling, self.sampler.sample(logits[:len(sampling)], sampling))

    def _commit(self, batch: SchedulerOutput, sampled: _Sampled) -> None:
        """Move the counters, then emit each new token. A failure while emitting one request's
        token fails that request only: the step is never run again."""
        output = sampled.output
        self.batcher.advance(batch, output.token_ids)
        self._record(batch, len(output.token_ids))
        for row, seq in enumerate(sampled.seqs):
            state = self._states[seq.request_id]
            try:
                self._postprocess(state, output.token_ids[row], output.log_probs[row], output.top_logprobs[row])
            except Exception as exc:  # noqa: BLE001 - the failure belongs to this request only
                logger.exception("post-processing request %s failed", seq.request_id)
                self._fail(state, InternalError(
                    f"the server failed on this request: {type(exc).__name__}: {exc}"))
            self._release_held(seq.request_id)

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

    def _mark_scheduled(self, batch: SchedulerOutput) -> None:
        now = time.monotonic()
        for item in batch.scheduled:
            state = self._states.get(item.seq.request_id)
            if state is not None and state.scheduled_at is None:
                state.scheduled_at = now

    def _postprocess(self, state: _RequestState, token: int, log_prob: float,
                     top_logprobs: list[tuple[int, float]] | None = None) -> None:
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
        sampled, top = self._logprobs(params, token, log_prob, top_logprobs)
        state.handle.put(TokenOutput(token, text, log_prob, reason, seq.num_prompt_tokens if final else None,
                                     sampled, top))
        if state.first_token_at is None:
            state.first_token_at = time.monotonic()
            self._notify(self.observer.on_first_token, self._request_report(state))
        if final:
            self._finish(state, reason)

    def _logprobs(self, params: GenerationParams, token: int, log_prob: float,
                  top_logprobs: list[tuple[int, float]] | None) -> tuple[TokenLogProb | None, tuple[TokenLogProb, ...]]:
        """The sampled token and the likeliest ones, decoded alone, when the request asked."""
        if params.logprobs is None:
            return None, ()
        top = tuple(TokenLogProb(token_id, self._token_text(token_id), value)
                    for token_id, value in top_logprobs or ())
        return TokenLogProb(token, self._token_text(token), log_prob), top

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._backend_tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _finish(self, state: _RequestState, reason: FinishReason, error: LmiError | None = None,
                cause: str | None = None) -> None:
        """Free the sequence once; an aborted or failed handle gets its end marker or its error.
        ``cause`` is the abort reason or the error type, for the observer."""
        if self._states.pop(state.seq.request_id, None) is None:
            return  # finished already (a failure while emitting its last token)
        if state.held:  # a held choice never reached the batcher
            state.held = False
        else:
            self.batcher.finish(state.seq, reason)
        self._release_held(state.seq.request_id)
        self.sampler.forget(state.seq)
        self.counters.finished[reason.value] += 1
        if error is not None:
            state.handle.put(error)
        elif reason is FinishReason.ABORT:
            state.handle.put(_END)
        with self._lock:
            self._num_pending -= 1
        self._notify(self.observer.on_request_finished, self._request_report(state, reason, cause))

    def _fail(self, state: _RequestState, error: LmiError) -> None:
        self.counters.failed[error.kind] += 1
        self._finish(state, FinishReason.ERROR, error, cause=error.kind)

    def _end_all(self, error: LmiError, reason: AbortReason) -> None:
        """Abort every request still in the engine; each handle gets ``error``."""
        for state in list(self._states.values()):
            self.counters.aborted[reason.value] += 1
            self._finish(state, FinishReason.ABORT, error, cause=reason.value)

    # ---- reports to the observer ---------------------------------------------------------------
    def _notify(self, hook, report) -> None:
        try:
            hook(report)
        except Exception:  # noqa: BLE001 - metrics must never stop the engine
            logger.exception("the engine observer failed")

    def _request_report(self, state: _RequestState, reason: FinishReason | None = None,
                        cause: str | None = None) -> RequestReport:
        seq, now = state.seq, time.monotonic()
        first_token_at = state.first_token_at
        num_output_tokens = seq.num_output_tokens
        ended = reason is not None
        decoding_s = None if first_token_at is None else now - first_token_at
        return RequestReport(
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=num_output_tokens,
            queue_s=None if state.scheduled_at is None else state.scheduled_at - seq.arrival_time,
            time_to_first_token_s=None if first_token_at is None else first_token_at - seq.arrival_time,
            finish_reason=reason,
            cause=cause,
            e2e_latency_s=now - seq.arrival_time if ended else None,
            time_per_output_token_s=(decoding_s / (num_output_tokens - 1)
                                     if ended and decoding_s is not None and num_output_tokens > 1 else None),
        )

    def _step_report(self) -> StepReport:
        manager = self.batcher.block_manager
        prefix = manager.stats()
        return StepReport(
            num_running=len(self.batcher.running),
            num_waiting=len(self.batcher.waiting) + sum(state.held for held in self._held.values() for state in held),
            num_blocks=manager.num_blocks,
            num_blocks_used=manager.num_used_blocks,
            num_blocks_free=manager.num_free_blocks,
            num_blocks_cached=manager.num_cached_blocks,
            num_preemptions_total=self.batcher.num_preemptions,
            num_generation_tokens_total=self.counters.tokens_generated,
            num_prefix_query_tokens_total=prefix["prefix_queries"] * manager.block_size,
            num_prefix_hit_tokens_total=prefix["prefix_hits"] * manager.block_size,
        )

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
            # The OpenMP threads a CPU forward uses (option.cpu_threads, see container/serve.py).
            "cpu_threads": torch.get_num_threads(),
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

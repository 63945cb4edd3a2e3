"""Serving requests through a custom handler: the init call, dynamic batching, and per-request
results and errors.

How requests reach ``handle`` follows serving.properties:

- by default, and with dynamic batching (``batch_size`` > 1, ``max_batch_delay``), one thread
  makes one ``handle`` call at a time, each with up to ``batch_size`` requests (DJL's batch
  layout); each caller gets its own slice of the returned ``Output``;
- when serving.properties asks for rolling or paged batching (``option.rolling_batch`` set to
  ``auto``, ``scheduler``, ``lmi-dist`` or ``vllm``), ``handle`` is called from the request threads
  concurrently, up to ``option.max_rolling_batch_size`` at once, so a handler that submits to the
  project's engine (``batching.handler_engine``) keeps its iteration-level batching. The handler
  must then be thread-safe.

An exception in ``handle`` fails only its request (424 with the message): when a batch call
fails, each member is retried alone, so ``handle`` may see a request twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from container.handler_loader import EntryPoint, last_line
from djl_like.config import ServingConfig, Strategy
from djl_like.errors import ConfigError, LmiError, ModelError, RequestTimeoutError, ServiceUnavailableError
from djl_like.inputs import Input, batch_input
from djl_like.outputs import Output, member_outputs

logger = logging.getLogger(__name__)
Handler = Callable[[Input], "Output | None"]


class HandlerReturnError(ModelError):
    """``handle`` returned something other than an ``Output`` for a request."""


@dataclass(eq=False)
class _Call:
    """One request waiting for its slice of a ``handle`` call."""

    inputs: Input
    arrival: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    output: Output | None = None
    error: LmiError | None = None
    cancelled: bool = False

    def finish(self, output: Output | None = None, error: LmiError | None = None) -> None:
        self.output, self.error = output, error
        self.done.set()


def concurrent_calls(config: ServingConfig) -> int:
    """How many ``handle`` calls may run at once (see the module docstring)."""
    if "strategy" in config.explicit and config.strategy is not Strategy.DYNAMIC:
        return config.max_rolling_batch_size
    return 1


class HandlerService:
    """Owns the user's handler: makes the init call, then serves requests through it."""

    def __init__(self, handler: Handler, entry: EntryPoint, config: ServingConfig):
        self._handler = handler
        self.entry = entry
        self.batch_size = config.batch_size
        self.max_batch_delay_s = config.max_batch_delay_ms / 1000.0
        self.job_queue_size = config.job_queue_size
        self.num_concurrent = concurrent_calls(config)
        self._slots = threading.BoundedSemaphore(self.num_concurrent)
        self._pending: deque[_Call] = deque()
        self._num_waiting = 0  # admitted and not answered yet: guarded by _condition
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self.counters: Counter = Counter()
        self.batch_size_histogram: Counter = Counter()

    # ---- life cycle ----------------------------------------------------------------------
    def initialize(self, properties: dict[str, str]) -> None:
        """The init call: an empty ``Input`` carrying ``properties``; raises ``ConfigError`` when
        the handler raises or answers with an error code, so ``serve`` stops with the reason."""
        try:
            result = self._handler(Input(properties))
        except BaseException as error:  # noqa: BLE001 - user code; the log has the traceback
            logger.exception("the init call of the handler %s failed", self.entry)
            raise ConfigError(f"the init call of the handler {self.entry} failed: {last_line(error)}") from None
        if isinstance(result, Output) and result.code >= 300:
            raise ConfigError(f"the init call of the handler {self.entry} answered {result.code}: "
                              f"{result.body.decode('utf-8', 'replace')[:500]}")

    def start(self) -> "HandlerService":
        if self.num_concurrent == 1:
            self._thread = threading.Thread(target=self._run, name="handler-batcher", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        """Refuse new requests; requests still queued fail with 503."""
        with self._condition:
            self._stopping = True
            pending, self._pending = list(self._pending), deque()
            self._condition.notify_all()
        for call in pending:
            call.finish(error=ServiceUnavailableError("the server shut down before this request ran"))

    @property
    def is_healthy(self) -> bool:
        if self._stopping or self.error is not None:
            return False
        return self._thread is None or self._thread.is_alive()

    # ---- requests (any thread) -------------------------------------------------------------
    def infer(self, inputs: Input, timeout_s: float) -> Output:
        """This request's ``Output``; raises its ``LmiError`` (424 for a handler failure, 503
        when the queue is full, 504 past ``timeout_s``)."""
        self._admit()
        try:
            if self.num_concurrent > 1:
                return self._infer_now(inputs, timeout_s)
            return self._infer_queued(_Call(inputs), timeout_s)
        finally:
            with self._condition:
                self._num_waiting -= 1

    def _admit(self) -> None:
        with self._condition:
            if self._stopping:
                raise ServiceUnavailableError("the server is shutting down")
            if self._num_waiting >= self.job_queue_size:
                raise ServiceUnavailableError(f"the request queue is full ({self.job_queue_size} requests)")
            self._num_waiting += 1

    def _infer_now(self, inputs: Input, timeout_s: float) -> Output:
        if not self._slots.acquire(timeout=timeout_s):
            raise RequestTimeoutError(f"no handler slot within option.predict_timeout ({timeout_s:g} s)")
        try:
            return self._call([inputs])[0]
        finally:
            self._slots.release()

    def _infer_queued(self, call: _Call, timeout_s: float) -> Output:
        with self._condition:
            self._pending.append(call)
            self._condition.notify_all()
        if not call.done.wait(timeout_s):
            with self._condition:
                call.cancelled = True  # NOTE: a call already inside handle runs to its end
            raise RequestTimeoutError(f"no result within option.predict_timeout ({timeout_s:g} s)")
        if call.error is not None:
            raise call.error
        return call.output

    # ---- the batching thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                batch = self._next_batch()
                if batch:
                    self._dispatch(batch)
        except BaseException as error:  # the loop itself broke: /ping turns 503
            logger.exception("the handler thread died")
            self.error = error

    def _next_batch(self) -> list[_Call]:
        """Wait for a request, then up to ``max_batch_delay`` for ``batch_size`` of them."""
        with self._condition:
            while not self._pending and not self._stopping:
                self._condition.wait()
            if self._stopping:
                return []
            deadline = self._pending[0].arrival + self.max_batch_delay_s
            while len(self._pending) < self.batch_size and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            batch = []
            while self._pending and len(batch) < self.batch_size:
                call = self._pending.popleft()
                if not call.cancelled:
                    batch.append(call)
            return batch

    def _dispatch(self, calls: list[_Call]) -> None:
        """One ``handle`` call for ``calls``; if it fails, each member alone."""
        try:
            outputs = self._call([call.inputs for call in calls])
        except LmiError as error:
            if len(calls) == 1:
                calls[0].finish(error=error)
                return
            logger.warning("a batch of %d requests failed (%s); retrying them one by one", len(calls), error.message)
            for call in calls:
                self._dispatch([call])
            return
        for call, output in zip(calls, outputs):
            call.finish(output)

    def _call(self, members: list[Input]) -> list[Output]:
        """Call ``handle`` and cut its ``Output`` per member; every failure becomes an ``LmiError``."""
        self.counters["calls"] += 1
        self.counters["requests"] += len(members)
        self.batch_size_histogram[len(members)] += 1
        try:
            result = self._handler(batch_input(members))
        except LmiError as error:  # a 400 the handler let through (invalid JSON body ...)
            self.counters["failed"] += 1
            raise
        except Exception as error:  # noqa: BLE001 - user code
            logger.exception("the handler %s raised", self.entry)
            self.counters["failed"] += 1
            raise ModelError(f"the handler raised {last_line(error)}") from None
        if not isinstance(result, Output):
            self.counters["failed"] += 1
            raise HandlerReturnError(f"the handler returned {type(result).__name__} for a request; "
                                     "it must return an Output (from djl_python import Output)")
        return member_outputs(result, len(members))

    def stats(self) -> dict:
        with self._condition:
            waiting = self._num_waiting
        return {"mode": "custom-handler", "handler": str(self.entry), "healthy": self.is_healthy,
                "concurrent_calls": self.num_concurrent, "batch_size": self.batch_size,
                "requests_in_flight": waiting, "calls": self.counters["calls"],
                "requests": self.counters["requests"], "failed_calls": self.counters["failed"],
                "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_size_histogram.items())}}

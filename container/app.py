"""The Flask application of one worker: routes only.

Parsing and validation live in ``djl_like``, generation in ``batching``; this module moves bytes
between HTTP and the engine. It also owns the two HTTP-only concerns: loading the engine in the
background (so ``/ping`` answers 503 meanwhile) and noticing clients that went away (so their
sequences are aborted and their KV cache freed at once).
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from batching.engine import Engine, RequestHandle
from batching.offline import create_engine
from container.modes import create_mode_app
from djl_like.config import ServingConfig
from djl_like.errors import (BadRequestError, ConfigError, LmiError, RequestTimeoutError,
                             ServiceUnavailableError)
from djl_like.formatters import (chat_completion_chunk, chat_stream_end, content_type, frame,
                                 format_chat_completion, format_response, stream_chunk)
from djl_like.protocol import AbortReason, GenerationParams, GenerationResult, TokenOutput
from djl_like.requests import InvocationRequest, check_body_size, parse_invocation

logger = logging.getLogger(__name__)

EngineFactory = Callable[[ServingConfig, str], Engine]
IGNORED_PARAMETERS_HEADER = "X-LMI-Ignored-Parameters"
# How often a waiting route looks at the client socket and the deadline.
POLL_INTERVAL_S = 0.25
READ_CHUNK_BYTES = 1 << 16
# Not a real reply (nobody is left to read it); nginx's code for "client closed request".
CLIENT_CLOSED_STATUS = 499
# Set on gunicorn's request body object when its framing broke (a bad chunk size ...): the
# worker (container.serve) then closes the connection instead of reading the bytes after it as
# a next request.
BROKEN_FRAMING_FLAG = "lmi_broken_framing"


def create_app(
    config: ServingConfig, model_path: str, *, engine_factory: EngineFactory = create_engine
) -> Flask:
    """Build the app and start loading the model in a background thread.

    ``engine_factory(config, model_path)`` returns an engine that is not started yet; it runs in
    the loader thread, so the app answers ``/ping`` (503) while it loads. A custom handler or a
    text-embedding model gets its own app (``container.modes``).
    """
    mode_app = create_mode_app(config, model_path)
    if mode_app is not None:
        return mode_app
    loader = EngineLoader(config, model_path, engine_factory)
    loader.start()
    app = Flask(__name__)
    app.json.sort_keys = False  # keep LMI's field order: generated_text first
    app.extensions["lmi_engine_loader"] = loader
    drain = Drain(loader)
    app.extensions["lmi_drain"] = drain
    _register_routes(app, config, loader, drain)
    _register_error_handlers(app)
    return app


# --- shutting down ------------------------------------------------------------------------------


class Drain:
    """The worker's shutdown: after ``begin()``, new requests are refused with 503 at once (a
    load balancer retries them elsewhere) and ``/ping`` answers 503, while the requests already
    admitted finish. The gunicorn worker (``container.serve``) starts it on SIGTERM, waits for
    ``num_in_flight`` to reach 0 or its time limit, and calls ``end()`` before it exits."""

    def __init__(self, loader: EngineLoader):
        self._loader = loader
        self._lock = threading.Lock()
        self._num_in_flight = 0
        self.started = threading.Event()

    @property
    def num_in_flight(self) -> int:
        """Admitted requests whose response is not complete yet (streams included)."""
        with self._lock:
            return self._num_in_flight

    def begin(self) -> None:
        self.started.set()

    def end(self) -> None:
        """Time is up: stop the engine; requests still in it fail with 503 (or a last error
        frame, for a stream that started)."""
        engine = self._loader.ready_engine()
        if engine is not None:
            engine.shutdown()

    def admit(self) -> None:
        """Count a new request in, or raise ``ServiceUnavailableError`` (503) when draining."""
        with self._lock:
            if self.started.is_set():
                raise ServiceUnavailableError(
                    "the server is shutting down; send the request to another instance")
            self._num_in_flight += 1

    def release(self) -> None:
        with self._lock:
            self._num_in_flight -= 1


# --- the engine, loaded in the background -----------------------------------------------------


class EngineLoader:
    """Holds the worker's engine: loading, ready, or failed. Thread-safe to read."""

    def __init__(self, config: ServingConfig, model_path: str, factory: EngineFactory):
        self.config = config
        self.model_path = model_path
        self._factory = factory
        self._engine: Engine | None = None
        self._chat_prompts: ChatPrompts | None = None
        self._error: BaseException | None = None
        self.loaded = threading.Event()  # set once loading has succeeded or failed

    def start(self) -> None:
        """Start loading in a daemon thread; returns at once."""
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def _load(self) -> None:
        started = time.monotonic()
        try:
            engine = self._factory(self.config, self.model_path)
            self._chat_prompts = ChatPrompts(engine)
            engine.start()
            self._engine = engine
            logger.info("model %s loaded in %.1f s (%s batching)", self.model_path,
                        time.monotonic() - started, self.config.strategy.value)
        except ConfigError as error:  # a setting this model cannot honour: the message says all
            logger.error("loading the model %s failed: %s", self.model_path, error)
            self._error = error
        except BaseException as error:  # noqa: BLE001 - /ping reports it; the worker stays up
            logger.exception("loading the model %s failed", self.model_path)
            self._error = error
        finally:
            self.loaded.set()

    @property
    def error(self) -> BaseException | None:
        """Why loading failed, or None."""
        return self._error

    def ready_engine(self) -> Engine | None:
        """The engine once loaded, else None."""
        return self._engine

    def health(self) -> tuple[int, dict]:
        """The ``/ping`` status code and body."""
        if self._error is not None:
            return 503, {"status": "unhealthy", "message": self._failure_message()}
        engine = self._engine
        if engine is None:
            return 503, {"status": "loading"}
        if not engine.is_healthy:
            return 503, {"status": "unhealthy", "message": _engine_failure(engine)}
        return 200, {"status": "healthy", "strategy": self.config.strategy.value}

    def engine(self) -> Engine:
        """The ready engine; raises ``ServiceUnavailableError`` (503) while loading or failed."""
        if self._error is not None:
            raise ServiceUnavailableError(self._failure_message())
        if self._engine is None:
            raise ServiceUnavailableError(
                "the model is still loading; retry when /ping answers 200")
        return self._engine

    def chat_prompts(self) -> ChatPrompts:
        """The chat renderer of the ready engine's model (see ``engine()``)."""
        self.engine()
        return self._chat_prompts

    def _failure_message(self) -> str:
        return f"loading the model failed: {type(self._error).__name__}: {self._error}"


def _engine_failure(engine: Engine) -> str:
    if engine.error is not None:
        return f"the engine stopped: {type(engine.error).__name__}: {engine.error}"
    return "the engine is not running"


class ChatPrompts:
    """Renders OpenAI chat messages into prompt text with the model's chat template (plain
    Jinja: the tokenizer itself is not used, so rendering needs no coordination with anyone)."""

    def __init__(self, engine: Engine):
        self._tokenizer = engine.tokenizer

    def render(self, messages: tuple[dict, ...]) -> str:
        """Raises ``BadRequestError`` when the model has no template or it refuses the messages.
        The text holds the template's special tokens (BOS ...): submit it without adding more."""
        if not getattr(self._tokenizer, "chat_template", None):
            raise BadRequestError("messages: this model has no chat template; send 'inputs'")
        try:
            return self._tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                       add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001 - templates raise on messages they refuse
            raise BadRequestError(f"messages: the chat template refused them: {error}") from None


# --- the client socket ------------------------------------------------------------------------


class ClientDisconnected(Exception):
    """The client closed its connection while its request was being generated."""


class ClientConnection:
    """Tells whether the client of the current request has closed its socket.

    gunicorn puts the socket in ``environ["gunicorn.socket"]``; other servers may not, and then
    a disconnect is only noticed when writing fails (streaming) or never (non-streaming).
    """

    def __init__(self, sock: socket.socket | None):
        self._sock = sock

    def is_gone(self) -> bool:
        """True when the peer has closed: the socket is readable and a peek reads nothing."""
        if self._sock is None:
            return False
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
            if not readable:
                return False
            # NOTE: a pipelined next request makes the socket readable too; it peeks as data.
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except (OSError, ValueError):  # reset by peer, or already closed
            return True


class _Deadline:
    """A time limit that a streaming route restarts at every token."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.restart()

    def restart(self) -> None:
        self._at = time.monotonic() + self.timeout_s

    def remaining(self) -> float:
        return self._at - time.monotonic()


def _watch(
    handle: RequestHandle, client: ClientConnection, deadline: _Deadline, *, per_token: bool
) -> Iterator[TokenOutput]:
    """Yield ``handle``'s outputs; abort it when the client goes or no result comes in time.

    ``per_token``: the deadline restarts at every token (streaming, where the client sees
    progress); otherwise it bounds the whole generation (``option.predict_timeout``).
    """
    while not handle.finished:
        if client.is_gone():
            handle.abort(AbortReason.CLIENT_DISCONNECTED)
            raise ClientDisconnected(handle.request_id)
        remaining = deadline.remaining()
        if remaining <= 0:
            handle.abort(AbortReason.TIMEOUT)
            waited_for = "next token" if per_token else "result"
            raise RequestTimeoutError(f"no {waited_for} within option.predict_timeout "
                                      f"({deadline.timeout_s:g} s); the request was aborted")
        try:
            for output in handle.outputs(timeout=min(POLL_INTERVAL_S, remaining)):
                yield output
                if per_token:
                    deadline.restart()
        except queue.Empty:
            continue


def _collect(
    handles: list[RequestHandle], prompts: list[str], client: ClientConnection, timeout_s: float
) -> list[GenerationResult]:
    """Wait for every handle's whole result within one deadline; abort them all on failure.
    ``prompts[i]`` is the prompt to report for ``handles[i]`` (what the client sent)."""
    deadline = _Deadline(timeout_s)
    try:
        return [GenerationResult(prompt=prompt,
                                 tokens=list(_watch(handle, client, deadline, per_token=False)))
                for handle, prompt in zip(handles, prompts)]
    finally:
        _abort_unfinished(handles)


def _abort_unfinished(handles: list[RequestHandle]) -> None:
    """Abort what another prompt's failure left running (a no-op for finished handles); a
    timeout or a disconnect already aborted its own handle with its reason."""
    for handle in handles:
        handle.abort(AbortReason.CANCELLED)


# --- routes -------------------------------------------------------------------------------------


def _register_routes(app: Flask, config: ServingConfig, loader: EngineLoader, drain: Drain) -> None:
    @app.get("/ping")
    def ping() -> Response:
        if drain.started.is_set():
            return _json({"status": "draining"}, 503)
        status, body = loader.health()
        return _json(body, status)

    @app.get("/stats")
    def stats() -> Response:
        return _json(loader.engine().stats())

    @app.post("/invocations")
    def invocations() -> Response:
        return _admitted(drain, lambda: _invoke(config, loader, chat_only=False))

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        return _admitted(drain, lambda: _invoke(config, loader, chat_only=True))


def _admitted(drain: Drain, handler: Callable[[], Response]) -> Response:
    """Run ``handler`` as an admitted request: counted in flight until its response is complete
    (a stream, until it closes), refused with 503 while the worker drains."""
    drain.admit()
    try:
        response = handler()
    except BaseException:
        drain.release()
        raise
    if response.is_streamed:
        response.call_on_close(drain.release)
    else:
        drain.release()
    return response


def _invoke(config: ServingConfig, loader: EngineLoader, *, chat_only: bool) -> Response:
    body = _read_body(config.max_payload_bytes)
    engine = loader.engine()
    invocation = parse_invocation(body, default_output_formatter=config.output_formatter,
                                  max_model_len=engine.batcher.config.max_model_len)
    if chat_only and not invocation.is_chat:
        raise BadRequestError("messages is missing: this route takes an OpenAI chat body")
    as_chat = loader.chat_prompts() if config.apply_chat_template else None
    call = _Call(engine, invocation, ClientConnection(request.environ.get("gunicorn.socket")),
                 config.predict_timeout_s, as_chat)
    if invocation.is_chat:
        response = _chat(call, loader.chat_prompts(), _model_name(config, loader))
    else:
        response = _generate(call)
    if invocation.unknown_parameters:
        ignored = ", ".join(invocation.unknown_parameters)
        logger.warning("ignoring unknown request parameters: %r", ignored)
        response.headers[IGNORED_PARAMETERS_HEADER] = _header_safe(ignored)
    return response


def _header_safe(text: str) -> str:
    """``text`` as a header value: printable ASCII, anything else backslash-escaped (a client's
    parameter names may hold line breaks or characters that HTTP headers cannot carry)."""
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in escaped)


def _read_body(limit: int) -> bytes:
    """The request body, refusing (413) a body over ``limit`` before reading it when possible."""
    if request.content_length is not None:
        check_body_size(request.content_length, limit)
    # NOTE: a chunked body has no Content-Length: read one byte past the limit to detect it.
    # A stream read may return less than asked, so read until the end or past the limit.
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = _read_chunk(min(READ_CHUNK_BYTES, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    check_body_size(size, limit)
    return b"".join(chunks)


def _read_chunk(size: int) -> bytes:
    """Up to ``size`` bytes of the body; a body whose framing is broken is a 400."""
    try:
        return request.stream.read(size)
    except OSError as error:  # gunicorn's InvalidChunkSize, ChunkMissingTerminator, NoMoreData ...
        _flag_broken_framing()
        detail = str(error) or "the connection ended before the body did"
        raise BadRequestError(f"request body could not be read: {type(error).__name__}: "
                              f"{detail}") from None


def _flag_broken_framing() -> None:
    try:
        setattr(request.environ["wsgi.input"], BROKEN_FRAMING_FLAG, True)
    except (KeyError, AttributeError):  # another WSGI server: it decides about the connection
        pass


@dataclass(frozen=True)
class _Call:
    """One invocation on its way through the engine."""

    engine: Engine
    invocation: InvocationRequest
    client: ClientConnection
    timeout_s: float
    # Set when option.apply_chat_template renders plain prompts as one user message.
    chat_prompts: "ChatPrompts | None" = None

    @property
    def params(self) -> GenerationParams:
        return self.invocation.params


# --- LMI text generation ------------------------------------------------------------------------


def _generate(call: _Call) -> Response:
    handles = _submit_all(call)
    prompts = list(call.invocation.prompts)
    if call.invocation.stream:
        handle = handles[0]
        frames = _generation_frames(call, handle, prompts[0])
        return _stream(frames, handle, call.invocation.output_formatter)
    results = _collect(handles, prompts, call.client, call.timeout_s)
    return _json(format_response(call.invocation, results))


def _submit_all(call: _Call) -> list[RequestHandle]:
    """Submit every prompt; if one is refused, abort the ones already queued."""
    handles: list[RequestHandle] = []
    try:
        for index, prompt in enumerate(call.invocation.prompts):
            handles.append(_submit(call, prompt, index))
    except BaseException:
        _abort_unfinished(handles)
        raise
    return handles


def _submit(call: _Call, prompt: str, index: int) -> RequestHandle:
    try:
        if call.chat_prompts is not None:
            rendered = call.chat_prompts.render(({"role": "user", "content": prompt},))
            return call.engine.submit(rendered, call.params, add_special_tokens=False)
        return call.engine.submit(prompt, call.params)
    except BadRequestError as error:
        if not call.invocation.is_batch:
            raise
        raise BadRequestError(f"inputs[{index}]: {error.message}") from None


def _generation_frames(call: _Call, handle: RequestHandle, prompt: str) -> Iterator[bytes]:
    """LMI stream frames; ``prompt`` (what the client sent, also when a chat template rendered
    it) is what ``return_full_text`` and ``details.inputs`` report, as in a whole response."""
    result = GenerationResult(prompt=prompt)

    def to_frame(token: TokenOutput) -> bytes:
        result.tokens.append(token)
        chunk = stream_chunk(token, result_so_far=result, params=call.params)
        return frame(chunk, call.invocation.output_formatter)

    return _stream_frames(call, handle, to_frame)


def _stream_frames(
    call: _Call, handle: RequestHandle, to_frame: Callable[[TokenOutput], bytes], end: bytes = b""
) -> Iterator[bytes]:
    """One frame per token, then ``end``. A failure after the status line was sent cannot change
    it any more: it becomes a last frame holding the error object."""
    output_formatter = call.invocation.output_formatter
    try:
        for token in _watch(handle, call.client, _Deadline(call.timeout_s), per_token=True):
            yield to_frame(token)
    except ClientDisconnected:
        logger.info("client of %s disconnected mid-stream; aborted", handle.request_id)
        return
    except LmiError as error:
        yield frame(error.to_dict(), output_formatter)
        return
    except Exception as error:  # noqa: BLE001 - reported in the stream, logged here
        logger.exception("stream of %s failed", handle.request_id)
        yield frame(_internal_error(error), output_formatter)
        return
    if end:
        yield end


def _stream(frames: Iterator[bytes], handle: RequestHandle, output_formatter: str) -> Response:
    response = Response(frames, content_type=content_type(output_formatter))
    # NOTE: the WSGI server closes the response when the client goes away (a write fails) or the
    # stream ends; closing aborts a request still running, even one whose stream never started.
    response.call_on_close(lambda: handle.abort(AbortReason.CLIENT_DISCONNECTED))
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # a proxy must not hold tokens back
    return response


# --- OpenAI chat --------------------------------------------------------------------------------


def _chat(call: _Call, chat_prompts: ChatPrompts, model: str) -> Response:
    rendered = chat_prompts.render(call.invocation.messages)
    handle = call.engine.submit(rendered, call.params, add_special_tokens=False)
    header = _ChatHeader(model=model, request_id=f"chatcmpl-{uuid.uuid4().hex}",
                         created=int(time.time()))
    if call.invocation.stream:
        return _stream(_chat_frames(call, handle, header), handle, call.invocation.output_formatter)
    result = _collect([handle], [rendered], call.client, call.timeout_s)[0]
    return _json(format_chat_completion(
        result, model=header.model, request_id=header.request_id, created=header.created,
        num_prompt_tokens=handle.num_prompt_tokens, logprobs=call.params.details))


@dataclass(frozen=True)
class _ChatHeader:
    model: str
    request_id: str
    created: int


def _chat_frames(call: _Call, handle: RequestHandle, header: _ChatHeader) -> Iterator[bytes]:
    output_formatter = call.invocation.output_formatter
    num_sent = 0

    def to_frame(token: TokenOutput) -> bytes:
        nonlocal num_sent
        chunk = chat_completion_chunk(token, model=header.model, request_id=header.request_id,
                                      created=header.created, first=num_sent == 0,
                                      logprobs=call.params.details)
        num_sent += 1
        return frame(chunk, output_formatter)

    return _stream_frames(call, handle, to_frame, chat_stream_end(output_formatter))


def _model_name(config: ServingConfig, loader: EngineLoader) -> str:
    return config.model_id or loader.model_path.rstrip("/").rsplit("/", 1)[-1]


# --- errors -------------------------------------------------------------------------------------


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(LmiError)
    def lmi_error(error: LmiError) -> Response:
        if error.status >= 500:
            logger.warning("%s: %s", error.kind, error.message)
        return _json(error.to_dict(), error.status)

    @app.errorhandler(ClientDisconnected)
    def client_disconnected(error: ClientDisconnected) -> Response:
        logger.info("client of %s disconnected; aborted", error)
        return _json({"code": CLIENT_CLOSED_STATUS, "type": "ClientClosedRequest",
                      "message": "the client closed the connection"}, CLIENT_CLOSED_STATUS)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        body = {"code": error.code, "type": type(error).__name__, "message": error.description}
        return _json(body, error.code or 500)

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        logger.exception("unexpected error while handling %s %s", request.method, request.path)
        return _json(_internal_error(error), 500)


def _internal_error(error: Exception) -> dict:
    return {"code": 500, "type": "InternalServerError",
            "message": f"unexpected error: {type(error).__name__}: {error}"}


def _json(body, status: int = 200) -> Response:
    response = jsonify(body)
    response.status_code = status
    return response

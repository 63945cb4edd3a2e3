"""The Flask application of one worker: routes only.

Parsing and validation live in ``djl_like``, generation in ``batching``; this module moves bytes
between HTTP and the engine. It also owns the two HTTP-only concerns: loading the engine in the
background (so ``/ping`` answers 503 meanwhile) and noticing clients that went away (so their
sequences are aborted and their KV cache freed at once).

Routes: LMI's ``/ping`` (``/health``), ``/invocations`` and TGI's ``/generate`` and
``/generate_stream`` over one handler; OpenAI's ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/models``; ``/stats`` and Prometheus ``/metrics``.
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
from dataclasses import dataclass, replace

from flask import Flask, Response, jsonify, request
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import HTTPException, NotFound

from batching.engine import Engine, EngineObserver, HandleGroup, RequestHandle
from batching.offline import create_engine
from container.metrics import ServerMetrics
from container.modes import create_mode_app
from container.service_loader import ServiceLoader
from djl_like.config import ServingConfig, served_model_name
from djl_like.errors import (BadRequestError, ConfigError, InternalError, LmiError, RequestTimeoutError,
                             ServiceUnavailableError)
from djl_like.formatters import content_type, format_response, frame, stream_chunk
from djl_like.openai_formatters import (ResponseHeader, Usage, chat_chunk, chat_completion, completion,
                                        completion_chunk, completion_logprobs, error_body, error_object,
                                        model_card, model_list, stream_end, usage_chunk)
from djl_like.openai_requests import OpenAIRequest, parse_chat_request, parse_completion_request
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
    model = served_model_name(config, model_path)
    metrics = ServerMetrics(model)
    loader = EngineLoader(config, model_path, engine_factory, observer=metrics.engine)
    loader.start()
    app, drain = worker_app(loader, openai_errors=True)
    _register_routes(app, _Server(config, loader, drain, metrics, model, int(time.time())))
    _count_responses(app, metrics)
    return app


def worker_app(loader: ServiceLoader, *, openai_errors: bool) -> tuple[Flask, "Drain"]:
    """A worker's Flask app in any mode: the loader and the drain ``serve`` uses, JSON errors
    (OpenAI's shape on ``/v1/`` with ``openai_errors``); the mode adds its routes."""
    app = Flask(__name__)
    app.json.sort_keys = False  # keep LMI's field order: generated_text first
    app.extensions["lmi_engine_loader"] = loader
    drain = Drain(loader)
    app.extensions["lmi_drain"] = drain
    _register_error_handlers(app, openai_errors=openai_errors)
    return app, drain


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


class EngineLoader(ServiceLoader):
    """Holds the worker's generation engine (see ``ServiceLoader``) and its model's chat renderer."""

    def __init__(self, config: ServingConfig, model_path: str, factory: EngineFactory,
                 observer: EngineObserver | None = None):
        super().__init__(self._build, "text-generation", f"the model {model_path}",
                         healthy={"strategy": config.strategy.value}, noun="engine")
        self.config = config
        self.model_path = model_path
        self._engine_factory = factory
        self._observer = observer
        self._chat_prompts: ChatPrompts | None = None

    def _build(self) -> Engine:
        engine = self._engine_factory(self.config, self.model_path)
        self._chat_prompts = ChatPrompts(engine)
        if self._observer is not None:
            engine.observer = self._observer
        return engine

    def engine(self) -> Engine:
        """The ready engine; raises ``ServiceUnavailableError`` (503) while loading or failed."""
        return self.service()

    def chat_prompts(self) -> ChatPrompts:
        """The chat renderer of the ready engine's model (see ``engine()``)."""
        self.engine()
        return self._chat_prompts


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
    handle: RequestHandle | HandleGroup, client: ClientConnection, deadline: _Deadline, *, per_token: bool
) -> Iterator:
    """Yield ``handle``'s outputs (a group's: ``(index, TokenOutput)``); abort it when the client
    goes or no result comes in time.

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


@dataclass(frozen=True)
class _Server:
    """What the routes of one worker share."""

    config: ServingConfig
    loader: EngineLoader
    drain: Drain
    metrics: ServerMetrics
    model: str  # option.served_model_name, or the model folder's name
    started: int  # Unix time, the "created" of /v1/models


def register_health_routes(app: Flask, drain: Drain, health: Callable[[], tuple[int, dict]],
                           stats: Callable[[], dict]) -> None:
    """``/ping`` (and ``/health``, the name vLLM and TGI users probe) and ``/stats``, the same in
    every mode: 503 while draining or not ready, else what ``health`` says."""
    @app.get("/ping")
    @app.get("/health")
    def ping() -> Response:
        if drain.started.is_set():
            return _json({"status": "draining"}, 503)
        status, body = health()
        return _json(body, status)

    @app.get("/stats")
    def stats_route() -> Response:
        return _json(stats())


def _register_routes(app: Flask, server: _Server) -> None:
    drain, loader = server.drain, server.loader

    register_health_routes(app, drain, loader.health, lambda: loader.engine().stats())

    @app.get("/metrics")
    def metrics() -> Response:
        data, media_type = server.metrics.exposition()
        return Response(data, content_type=media_type)

    @app.post("/invocations")
    def invocations() -> Response:
        return _admitted(drain, lambda: _invoke(server))

    @app.post("/generate")
    def generate() -> Response:
        return _admitted(drain, lambda: _invoke(server, tgi_stream=False))

    @app.post("/generate_stream")
    def generate_stream() -> Response:
        return _admitted(drain, lambda: _invoke(server, tgi_stream=True))

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        return _admitted(drain, lambda: _openai(server, parse_chat_request))

    @app.post("/v1/completions")
    def completions() -> Response:
        return _admitted(drain, lambda: _openai(server, parse_completion_request))

    # NOTE: 503 until the model has loaded, as /ping: vLLM and TGI answer nothing before then, so
    # clients and orchestrators use /v1/models as a readiness probe.
    @app.get("/v1/models")
    def models() -> Response:
        server.loader.engine()
        return _json(model_list(server.model, server.started))

    @app.get("/v1/models/<path:model>")
    def one_model(model: str) -> Response:
        server.loader.engine()
        if model != server.model:
            raise NotFound(f"the model {model!r} does not exist; this server serves {server.model!r}")
        return _json(model_card(server.model, server.started))


def _count_responses(app: Flask, metrics: ServerMetrics) -> None:
    @app.after_request
    def count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.count_response(route, request.method, response.status_code)
        return response


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


def _invoke(server: _Server, *, tgi_stream: bool | None = None) -> Response:
    """``/invocations`` (LMI generation or OpenAI chat); with ``tgi_stream`` set, TGI's
    ``/generate`` (never streams) or ``/generate_stream`` (always SSE) over the same handler."""
    config, loader = server.config, server.loader
    body = _read_body(config.max_payload_bytes)
    engine = loader.engine()
    invocation = parse_invocation(body, default_output_formatter=config.output_formatter,
                                  max_model_len=engine.max_model_len)
    if invocation.is_chat:
        if tgi_stream is not None:
            raise BadRequestError("messages: this route takes 'inputs'; send chat to /v1/chat/completions")
        response = _answer_openai(server, engine, invocation, openai_errors=False)
    else:
        if tgi_stream is not None:
            invocation = _as_tgi(invocation, tgi_stream)
        as_chat = loader.chat_prompts() if config.apply_chat_template else None
        response = _generate(_Call(engine, invocation, _client(), config.predict_timeout_s, as_chat))
    return _with_ignored_header(response, invocation.unknown_parameters)


def _as_tgi(invocation: InvocationRequest, stream: bool) -> InvocationRequest:
    if stream and invocation.is_batch:
        raise BadRequestError("inputs: /generate_stream streams one prompt; send a string")
    return replace(invocation, stream=stream, output_formatter="sse" if stream else "json")


def _with_ignored_header(response: Response, unknown_parameters: tuple[str, ...]) -> Response:
    if unknown_parameters:
        ignored = ", ".join(unknown_parameters)
        logger.warning("ignoring unknown request parameters: %r", ignored)
        response.headers[IGNORED_PARAMETERS_HEADER] = _header_safe(ignored)
    return response


def _client() -> ClientConnection:
    return ClientConnection(request.environ.get("gunicorn.socket"))


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
    except (OSError, ParseException) as error:  # InvalidChunkSize, ChunkMissingTerminator, NoMoreData ...
        # NOTE: gunicorn 26 raises these as OSError subclasses, gunicorn 27 as ParseException.
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
    """One LMI invocation on its way through the engine."""

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
    output_formatter = call.invocation.output_formatter

    def to_frame(token: TokenOutput) -> bytes:
        result.tokens.append(token)
        chunk = stream_chunk(token, result_so_far=result, params=call.params)
        return frame(chunk, output_formatter)

    return _stream_frames(_StreamSource(handle, call.client, call.timeout_s, output_formatter), to_frame)


@dataclass(frozen=True)
class _StreamSource:
    """Where a stream's items come from and how its frames are written."""

    outputs: RequestHandle | HandleGroup
    client: ClientConnection
    timeout_s: float
    output_formatter: str
    error_shape: Callable[[LmiError], dict] = LmiError.to_dict


def _stream_frames(source: _StreamSource, to_frame: Callable, *, opening: Iterator[bytes] = (),
                   closing: Callable[[], bytes] | None = None) -> Iterator[bytes]:
    """``opening``, one frame per output, then ``closing()``. A failure after the status line was
    sent cannot change it any more: it becomes a last frame holding the error object."""
    output_formatter = source.output_formatter
    try:
        yield from opening
        for item in _watch(source.outputs, source.client, _Deadline(source.timeout_s), per_token=True):
            yield to_frame(item)
    except ClientDisconnected:
        logger.info("client of %s disconnected mid-stream; aborted", _request_id(source.outputs))
        return
    except LmiError as error:
        yield frame(source.error_shape(error), output_formatter)
        return
    except Exception as error:  # noqa: BLE001 - reported in the stream, logged here
        logger.exception("stream of %s failed", _request_id(source.outputs))
        yield frame(source.error_shape(_internal_error(error)), output_formatter)
        return
    last = closing() if closing is not None else b""
    if last:  # NOTE: an empty chunk would end a chunked response early
        yield last


def _request_id(outputs: RequestHandle | HandleGroup) -> str:
    handles = outputs.handles if isinstance(outputs, HandleGroup) else [outputs]
    return ", ".join(handle.request_id for handle in handles)


def _stream(frames: Iterator[bytes], handle: RequestHandle | HandleGroup, output_formatter: str) -> Response:
    response = Response(frames, content_type=content_type(output_formatter))
    # NOTE: the WSGI server closes the response when the client goes away (a write fails) or the
    # stream ends; closing aborts a request still running, even one whose stream never started.
    response.call_on_close(lambda: handle.abort(AbortReason.CLIENT_DISCONNECTED))
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # a proxy must not hold tokens back
    return response


# --- OpenAI chat and completions ----------------------------------------------------------------


def _openai(server: _Server, parse: Callable[..., OpenAIRequest]) -> Response:
    body = _read_body(server.config.max_payload_bytes)
    engine = server.loader.engine()
    openai_request = parse(body, max_model_len=engine.max_model_len)
    response = _answer_openai(server, engine, openai_request, openai_errors=True)
    return _with_ignored_header(response, openai_request.unknown_parameters)


@dataclass(frozen=True)
class _OpenAICall:
    """One OpenAI request on its way through the engine: every choice of every prompt is a
    member of ``group``; choice ``i`` of prompt ``p`` has index ``p * n + i``."""

    request: OpenAIRequest
    group: HandleGroup
    header: ResponseHeader
    prompt_texts: list[str]  # per choice: what echo prepends
    source: _StreamSource

    @property
    def logprobs(self) -> bool:
        return self.request.params.logprobs is not None

    def usage(self, num_completion_tokens: int) -> Usage:
        """The prompt of each prompt counts once, whatever ``n`` is."""
        handles = self.group.handles[::self.request.n]
        return Usage(sum(handle.num_prompt_tokens for handle in handles), num_completion_tokens)


def _answer_openai(server: _Server, engine: Engine, openai_request: OpenAIRequest, *,
                   openai_errors: bool) -> Response:
    prompts, add_special_tokens = _openai_prompts(server.loader, engine, openai_request)
    group = _submit_choices(engine, openai_request, prompts, add_special_tokens)
    kind = "chatcmpl" if openai_request.is_chat else "cmpl"
    header = ResponseHeader(f"{kind}-{uuid.uuid4().hex}", int(time.time()), server.model)
    error_shape = _openai_error_shape if openai_errors else LmiError.to_dict
    source = _StreamSource(group, _client(), server.config.predict_timeout_s, openai_request.output_formatter,
                           error_shape)
    texts = [_prompt_text(engine, prompt) for prompt in prompts for _ in range(openai_request.n)]
    call = _OpenAICall(openai_request, group, header, texts, source)
    if openai_request.stream:
        frames = _chat_frames(call) if openai_request.is_chat else _completion_frames(call)
        return _stream(frames, group, openai_request.output_formatter)
    results = _collect_group(call)
    usage = call.usage(sum(len(result.tokens) for result in results))
    if openai_request.is_chat:
        return _json(chat_completion(results, header=header, usage=usage, logprobs=call.logprobs))
    return _json(completion(results, header=header, usage=usage, echo=openai_request.echo, logprobs=call.logprobs))


def _openai_prompts(loader: EngineLoader, engine: Engine,
                    openai_request: OpenAIRequest) -> tuple[list[str | list[int]], bool]:
    """The prompts to submit, and whether the tokenizer adds its special tokens (a rendered chat
    template wrote them itself)."""
    if openai_request.is_chat:
        return [loader.chat_prompts().render(openai_request.messages)], False
    return [prompt if isinstance(prompt, str) else list(prompt) for prompt in openai_request.prompts], True


def _prompt_text(engine: Engine, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)


def _submit_choices(engine: Engine, openai_request: OpenAIRequest, prompts: list[str | list[int]],
                    add_special_tokens: bool) -> HandleGroup:
    """Submit ``n`` choices of every prompt into one group; if one is refused, abort the rest."""
    group = HandleGroup()
    choices = openai_request.choice_params()
    try:
        for index, prompt in enumerate(prompts):
            try:
                engine.submit_choices(prompt, choices, add_special_tokens=add_special_tokens, group=group)
            except BadRequestError as error:
                if len(prompts) == 1:
                    raise
                raise BadRequestError(f"prompt[{index}]: {error.message}") from None
    except BaseException:
        group.abort(AbortReason.CANCELLED)
        raise
    return group


def _collect_group(call: _OpenAICall) -> list[GenerationResult]:
    """Every choice's whole result, within one deadline; abort them all on failure."""
    results = [GenerationResult(prompt=text) for text in call.prompt_texts]
    source = call.source
    try:
        for index, token in _watch(call.group, source.client, _Deadline(source.timeout_s), per_token=False):
            results[index].tokens.append(token)
    finally:
        call.group.abort(AbortReason.CANCELLED)  # a no-op for the finished ones
    return results


def _chat_frames(call: _OpenAICall) -> Iterator[bytes]:
    started: set[int] = set()
    counter = _TokenCounter()

    def to_frame(item: tuple[int, TokenOutput]) -> bytes:
        index, token = item
        counter.count()
        first = index not in started
        started.add(index)
        chunk = chat_chunk(token, header=call.header, index=index, first=first, logprobs=call.logprobs,
                           with_usage=call.request.include_usage)
        return frame(chunk, call.source.output_formatter)

    closing = _closing(call, "chat.completion.chunk", counter)
    return _stream_frames(call.source, to_frame, closing=closing)


def _completion_frames(call: _OpenAICall) -> Iterator[bytes]:
    echo = call.request.echo
    offsets = [len(text) if echo else 0 for text in call.prompt_texts]
    counter = _TokenCounter()
    output_formatter = call.source.output_formatter
    with_usage = call.request.include_usage

    def to_frame(item: tuple[int, TokenOutput]) -> bytes:
        index, token = item
        counter.count()
        logprobs = completion_logprobs([token], offsets[index]) if call.logprobs else None
        if token.sampled is not None:
            offsets[index] += len(token.sampled.text)
        chunk = completion_chunk(token.text, header=call.header, index=index, token=token, logprobs=logprobs,
                                 with_usage=with_usage)
        return frame(chunk, output_formatter)

    # NOTE: with echo, each choice's stream starts with its prompt (vLLM does the same).
    opening = (frame(completion_chunk(text, header=call.header, index=index, with_usage=with_usage),
                     output_formatter) for index, text in enumerate(call.prompt_texts) if echo)
    closing = _closing(call, "text_completion", counter)
    return _stream_frames(call.source, to_frame, opening=opening, closing=closing)


class _TokenCounter:
    """Tokens streamed so far, over every choice (the usage chunk's completion tokens)."""

    def __init__(self) -> None:
        self.num_tokens = 0

    def count(self) -> None:
        self.num_tokens += 1


def _closing(call: _OpenAICall, object_name: str, counter: _TokenCounter) -> Callable[[], bytes]:
    """The end of a stream: the usage chunk when asked for, then ``[DONE]`` (under SSE)."""
    output_formatter = call.source.output_formatter

    def closing() -> bytes:
        end = stream_end(output_formatter)
        if not call.request.include_usage:
            return end
        usage = usage_chunk(call.header, object_name, call.usage(counter.num_tokens))
        return frame(usage, output_formatter) + end

    return closing


# --- errors -------------------------------------------------------------------------------------


def _register_error_handlers(app: Flask, *, openai_errors: bool = False) -> None:
    """Errors as JSON: LMI's ``{"code", "type", "message"}``, or with ``openai_errors`` OpenAI's
    ``{"error": {...}}`` on the ``/v1/`` routes (what OpenAI clients parse)."""

    def openai_route() -> bool:
        return openai_errors and request.path.startswith("/v1/")

    @app.errorhandler(LmiError)
    def lmi_error(error: LmiError) -> Response:
        if error.status >= 500:
            logger.warning("%s: %s", error.kind, error.message)
        body = _openai_error_shape(error) if openai_route() else error.to_dict()
        return _json(body, error.status)

    @app.errorhandler(ClientDisconnected)
    def client_disconnected(error: ClientDisconnected) -> Response:
        logger.info("client of %s disconnected; aborted", error)
        message = "the client closed the connection"
        body = (error_object(CLIENT_CLOSED_STATUS, message) if openai_route() else
                {"code": CLIENT_CLOSED_STATUS, "type": "ClientClosedRequest", "message": message})
        return _json(body, CLIENT_CLOSED_STATUS)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        body = (error_object(status, error.description) if openai_route() else
                {"code": error.code, "type": type(error).__name__, "message": error.description})
        return _json(body, status)

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        logger.exception("unexpected error while handling %s %s", request.method, request.path)
        internal = _internal_error(error)
        return _json(_openai_error_shape(internal) if openai_route() else internal.to_dict(), 500)


def _openai_error_shape(error: LmiError) -> dict:
    return error_body(error, getattr(error, "param", None))


def _internal_error(error: Exception) -> InternalError:
    return InternalError(f"unexpected error: {type(error).__name__}: {error}")


def _json(body, status: int = 200) -> Response:
    response = jsonify(body)
    response.status_code = status
    return response

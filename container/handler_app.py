"""The Flask app of a worker that serves a custom handler (``option.entryPoint`` / ``model.py``).

``POST /invocations`` hands the body (any content type) and the HTTP headers to ``handle`` as an
``Input``; the request's slice of the returned ``Output`` becomes the response: its code, its
properties as headers (``Content-Type`` ...), and its content, or its stream content as a chunked
response.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

from flask import Flask, Response, request

from container.app import Drain, _admitted, _read_body, register_health_routes, worker_app
from container.handler_loader import EntryPoint, import_handler, init_properties, install_requirements
from container.handler_service import HandlerService
from container.service_loader import ServiceLoader
from djl_like.config import ServingConfig
from djl_like.errors import LmiError
from djl_like.inputs import DATA_KEY, Input
from djl_like.outputs import Output
from djl_like.pair_list import PairList

logger = logging.getLogger(__name__)

MODE = "custom-handler"
STREAM_CONTENT_TYPE = "application/jsonlines"
# Response headers the WSGI server sets itself.
_HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


def create_handler_app(config: ServingConfig, model_path: str, entry: EntryPoint) -> Flask:
    """The app; the handler is imported and initialised in the background (``/ping`` 503 until
    then; a failure stops ``serve`` with its reason)."""
    loader = ServiceLoader(lambda: load_handler_service(config, model_path, entry), MODE,
                           f"the handler {entry}").start()
    app, drain = worker_app(loader, openai_errors=False)
    _register_routes(app, config, loader, drain)
    return app


def load_handler_service(config: ServingConfig, model_path: str, entry: EntryPoint) -> HandlerService:
    """requirements.txt (when allowed), import, the init call: a handler ready to serve."""
    install_requirements(entry.folder, config.install_requirements)
    service = HandlerService(import_handler(entry), entry, config)
    service.initialize(init_properties(config, model_path, os.environ, _device_id()))
    return service


def _device_id() -> str:
    import torch

    return "0" if torch.cuda.is_available() else "-1"


def _register_routes(app: Flask, config: ServingConfig, loader: ServiceLoader, drain: Drain) -> None:
    register_health_routes(app, drain, loader.health, lambda: loader.service().stats())

    @app.post("/invocations")
    def invocations() -> Response:
        return _admitted(drain, lambda: _invoke(config, loader))


def _invoke(config: ServingConfig, loader: ServiceLoader) -> Response:
    body = _read_body(config.max_payload_bytes)
    service = loader.service()
    inputs = Input(dict(request.headers.items()), PairList([(DATA_KEY, body)]))
    return _response(service.infer(inputs, config.predict_timeout_s))


def _response(output: Output) -> Response:
    headers = {key: value for key, value in output.properties.items() if key.lower() not in _HOP_HEADERS}
    if output.stream_content is None:
        response = Response(output.body, status=output.code, headers=headers)
        if not any(key.lower() == "content-type" for key in headers):
            response.headers["Content-Type"] = _default_content_type(output.body)
        return response
    response = Response(_stream(output), status=output.code, headers=headers)
    response.headers.setdefault("Content-Type", STREAM_CONTENT_TYPE)
    response.headers["Cache-Control"] = "no-cache"
    return response


def _default_content_type(body: bytes) -> str:
    """For an Output without a Content-Type property: JSON when the body is JSON (what
    ``add_as_json`` wrote), else bytes."""
    try:
        json.loads(body)
    except ValueError:
        return "application/octet-stream"
    return "application/json"


def _stream(output: Output) -> Iterator[bytes]:
    """The stream's chunks; a failure after the status line was sent becomes a last JSON line."""
    try:
        yield from output.stream_chunks()
    except LmiError as error:
        yield _error_line(error.to_dict())
    except Exception as error:  # noqa: BLE001 - user code; reported in the stream, logged here
        logger.exception("the handler's stream failed")
        yield _error_line({"code": 424, "type": "ModelError",
                           "message": f"the handler's stream failed: {type(error).__name__}: {error}"})


def _error_line(body: dict) -> bytes:
    return json.dumps(body).encode() + b"\n"

"""The Flask app of a worker that serves text embeddings (``option.task=text-embedding``, or an
encoder / sentence-transformers model folder).

``POST /invocations`` takes LMI's ``{"inputs": "text" | [...]}`` and answers a vector or a list
of vectors; ``POST /v1/embeddings`` speaks OpenAI's embeddings API. Texts from concurrent requests
are batched together by the embedding engine (``batch_size``, ``max_batch_delay``).
"""

from __future__ import annotations

import logging

from flask import Flask, Response

from batching.embedding_engine import EmbeddingEngine, create_embedding_engine
from container.app import (IGNORED_PARAMETERS_HEADER, Drain, _admitted, _header_safe, _json, _read_body,
                           register_health_routes, worker_app)
from container.service_loader import ServiceLoader
from djl_like.config import ServingConfig
from djl_like.embedding_formatters import format_embeddings, format_openai_embeddings
from djl_like.embedding_requests import EmbeddingRequest, parse_embedding_invocation, parse_openai_embeddings

logger = logging.getLogger(__name__)

MODE = "text-embedding"


def create_embedding_app(config: ServingConfig, model_path: str) -> Flask:
    """The app; the model loads in the background (``/ping`` 503 until it is ready)."""
    loader = ServiceLoader(lambda: create_embedding_engine(config, model_path), MODE,
                           f"the embedding model {model_path}").start()
    app, drain = worker_app(loader, openai_errors=True)  # /v1/embeddings answers OpenAI's error object
    _register_routes(app, config, loader, drain, _model_name(config, model_path))
    return app


def _register_routes(app: Flask, config: ServingConfig, loader: ServiceLoader, drain: Drain, model: str) -> None:
    register_health_routes(app, drain, loader.health, lambda: loader.service().stats())

    @app.post("/invocations")
    def invocations() -> Response:
        return _admitted(drain, lambda: _invoke(config, loader))

    @app.post("/v1/embeddings")
    def embeddings() -> Response:
        return _admitted(drain, lambda: _openai(config, loader, model))


def _invoke(config: ServingConfig, loader: ServiceLoader) -> Response:
    body = _read_body(config.max_payload_bytes)
    engine: EmbeddingEngine = loader.service()
    embedding = parse_embedding_invocation(body)
    vectors, _ = _embed(engine, embedding, config.predict_timeout_s)
    return _with_ignored(_json(format_embeddings(embedding, vectors)), embedding)


def _openai(config: ServingConfig, loader: ServiceLoader, model: str) -> Response:
    body = _read_body(config.max_payload_bytes)
    engine: EmbeddingEngine = loader.service()
    embedding = parse_openai_embeddings(body, engine.model.dimension)
    vectors, num_tokens = _embed(engine, embedding, config.predict_timeout_s)
    answer = format_openai_embeddings(embedding, vectors, model=model, num_prompt_tokens=num_tokens)
    return _with_ignored(_json(answer), embedding)


def _embed(engine: EmbeddingEngine, embedding: EmbeddingRequest, timeout_s: float) -> tuple[list, int]:
    handle = engine.submit(list(embedding.texts))
    return handle.result(timeout_s), handle.num_tokens


def _with_ignored(response: Response, embedding: EmbeddingRequest) -> Response:
    if embedding.unknown_parameters:
        ignored = ", ".join(embedding.unknown_parameters)
        logger.warning("ignoring unknown request parameters: %r", ignored)
        response.headers[IGNORED_PARAMETERS_HEADER] = _header_safe(ignored)
    return response


def _model_name(config: ServingConfig, model_path: str) -> str:
    return config.model_id or model_path.rstrip("/").rsplit("/", 1)[-1]

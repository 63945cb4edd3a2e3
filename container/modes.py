"""Which of LMI's modes a worker serves: a custom handler, text embedding, or text generation
(the built-in handler, ``container.app``). Decided once per worker, from serving.properties and
the model folder."""

from __future__ import annotations

import logging

from flask import Flask

from container.handler_loader import find_entry_point
from djl_like.config import ServingConfig

logger = logging.getLogger(__name__)


def create_mode_app(config: ServingConfig, model_path: str) -> Flask | None:
    """The app of a custom handler or of text embedding, or None for text generation."""
    entry = find_entry_point(config, model_path)
    if entry is not None:
        from container.handler_app import create_handler_app

        logger.info("serving the custom handler %s", entry)
        return create_handler_app(config, model_path, entry)
    return None

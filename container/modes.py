"""Which of LMI's modes a worker serves: a custom handler, text embedding, or text generation
(the built-in handler, ``container.app``). Decided once per worker, from serving.properties and
the model folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flask import Flask

from container.handler_loader import find_entry_point
from djl_like.config import ServingConfig

logger = logging.getLogger(__name__)

TEXT_EMBEDDING = "text-embedding"
TEXT_GENERATION = "text-generation"
# Files that make a folder a sentence-transformers model.
_SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json")
_GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
# Bare encoders (BertModel, XLMRobertaModel ...) and masked-LM checkpoints: embedders.
_ENCODER_SUFFIXES = ("Model", "ForMaskedLM")


def create_mode_app(config: ServingConfig, model_path: str) -> Flask | None:
    """The app of a custom handler or of text embedding, or None for text generation."""
    entry = find_entry_point(config, model_path)
    if entry is not None:
        from container.handler_app import create_handler_app

        logger.info("serving the custom handler %s", entry)
        return create_handler_app(config, model_path, entry)
    if infer_task(config, model_path) == TEXT_EMBEDDING:
        from container.embedding_app import create_embedding_app

        logger.info("serving text embeddings of %s", model_path)
        return create_embedding_app(config, model_path)
    return None


def infer_task(config: ServingConfig, model_path: str) -> str:
    """``option.task`` when set; else text embedding for a sentence-transformers folder or an
    encoder architecture, text generation otherwise."""
    if config.task is not None:
        return config.task
    folder = Path(model_path)
    if any((folder / name).is_file() for name in _SENTENCE_TRANSFORMERS_FILES):
        return TEXT_EMBEDDING
    architectures = _architectures(folder)
    if architectures and not any(name.endswith(_GENERATIVE_SUFFIXES) for name in architectures) and all(
            name.endswith(_ENCODER_SUFFIXES) for name in architectures):
        return TEXT_EMBEDDING
    return TEXT_GENERATION


def _architectures(folder: Path) -> list[str]:
    try:
        return list(json.loads((folder / "config.json").read_text()).get("architectures") or [])
    except (OSError, ValueError):
        return []

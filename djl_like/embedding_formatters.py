"""Response bodies of text embedding: LMI's (a vector, or a list of vectors) and OpenAI's
``/v1/embeddings`` list object (``float`` or ``base64`` encoded, with ``usage``)."""

from __future__ import annotations

import base64
import struct

from djl_like.embedding_requests import EmbeddingRequest


def format_embeddings(request: EmbeddingRequest, vectors: list[list[float]]) -> list:
    """``{"inputs": "text"}`` -> ``[floats]``; a list of inputs -> ``[[floats], ...]``."""
    return vectors if request.is_batch else vectors[0]


def format_openai_embeddings(request: EmbeddingRequest, vectors: list[list[float]], *, model: str,
                             num_prompt_tokens: int) -> dict:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": index, "embedding": _encode(vector, request.encoding_format)}
                 for index, vector in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": num_prompt_tokens, "total_tokens": num_prompt_tokens},
    }


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    # OpenAI's base64: the little-endian float32 bytes of the vector.
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")

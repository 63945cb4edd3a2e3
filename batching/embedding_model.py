"""The embedding model: an encoder (BERT family, sentence-transformers folders) or a decoder used
as an embedder, loaded once; turns a batch of tokenized texts into one vector per text.

Texts are packed into one row without padding (``batching.embedding_attention``) when the model
computes the same vectors that way; a probe at load compares the packed forward with the padded
one and falls back to padded batches (logged) for models whose positions or attention the packed
path cannot reproduce.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from batching import embedding_attention
from batching.embedding_attention import PackedTexts, packed_texts
from batching.pooling import POOLING_MODES, pool, sentence_transformers_pooling
from batching.runner import pick_device, pick_dtype
from djl_like.errors import ConfigError

logger = logging.getLogger(__name__)

_DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_ST_SETTINGS = "sentence_bert_config.json"
# Two texts of different lengths: the packed and the padded forward must agree on them.
PROBE_TEXTS = ("Embeddings of one packed row.", "A second, longer text makes the two lengths differ a lot.")
# Above this, a tokenizer's model_max_length is transformers' "no limit" placeholder.
_NO_TOKENIZER_LIMIT = 1_000_000


def is_decoder_architecture(config) -> bool:
    """True for causal LM checkpoints (served as embedders with last-token pooling)."""
    return any(name.endswith(_DECODER_SUFFIXES) for name in (getattr(config, "architectures", None) or []))


class EmbeddingModel:
    """Owns the model and the tokenizer of the text-embedding mode. ``embed`` is called from one
    thread at a time (the embedding engine's)."""

    def __init__(self, model_path: str, *, dtype: str = "auto", device: str | None = None,
                 trust_remote_code: bool = False, revision: str | None = None, pooling: str | None = None,
                 normalize: bool = True, max_model_len: int | None = None):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code, revision=revision)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device, config)
        self.is_decoder = is_decoder_architecture(config)
        self.pooling = pooling or sentence_transformers_pooling(model_path) or ("last" if self.is_decoder else "mean")
        if self.pooling not in POOLING_MODES:
            raise ConfigError(f"pooling {self.pooling!r} is not supported; choose one of {', '.join(POOLING_MODES)}")
        self.normalize = normalize
        self.model = AutoModel.from_pretrained(
            model_path, dtype=self.dtype, attn_implementation=embedding_attention.register(),
            trust_remote_code=trust_remote_code, revision=revision).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code, revision=revision)
        self.pad_token_id = self.tokenizer.pad_token_id or 0
        self.max_model_len = resolve_embedding_len(max_model_len, self.model.config, self.tokenizer, model_path)
        self.dimension = int(self.model.config.get_text_config().hidden_size)
        self.packed = self._packing_matches_padding()
        logger.info("embedding model %s: %s pooling, normalize=%s, %d dimensions, at most %d tokens, %s batches",
                    model_path, self.pooling, normalize, self.dimension, self.max_model_len,
                    "packed" if self.packed else "padded")

    @torch.inference_mode()
    def embed(self, texts: list[list[int]]) -> torch.Tensor:
        """One vector per text: [num_texts, dimension], float32 on the CPU."""
        states = self._packed_states(texts) if self.packed else self._padded_states(texts)
        vectors = torch.stack([pool(text_states, self.pooling) for text_states in states]).float()
        if self.normalize:
            vectors = F.normalize(vectors, p=2, dim=-1)
        return vectors.cpu()

    def _packed_states(self, texts: list[list[int]]) -> list[torch.Tensor]:
        """Every text in one row: input_ids/position_ids [1, total tokens]."""
        texts_meta = PackedTexts.of([len(ids) for ids in texts])
        input_ids = torch.tensor([[token for ids in texts for token in ids]], device=self.device)
        positions = torch.tensor([[p for ids in texts for p in range(len(ids))]], device=self.device)
        with packed_texts(texts_meta):
            hidden = self.model(input_ids=input_ids, position_ids=positions).last_hidden_state[0]
        return [hidden[start:end] for start, end in texts_meta.spans()]

    def _padded_states(self, texts: list[list[int]]) -> list[torch.Tensor]:
        """A right-padded batch with its attention mask: [num_texts, longest]."""
        longest = max(len(ids) for ids in texts)
        input_ids = torch.tensor([ids + [self.pad_token_id] * (longest - len(ids)) for ids in texts], device=self.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in texts], device=self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return [hidden[row, :len(ids)] for row, ids in enumerate(texts)]

    @torch.inference_mode()
    def _packing_matches_padding(self) -> bool:
        """Probe: do packed texts get the vectors the padded batch gives them?"""
        texts = [self.tokenizer(text)["input_ids"] for text in PROBE_TEXTS]
        padded = torch.stack([pool(states, self.pooling) for states in self._padded_states(texts)]).float()
        try:
            packed = torch.stack([pool(states, self.pooling) for states in self._packed_states(texts)]).float()
        except Exception as error:  # noqa: BLE001 - any failure means: serve padded
            logger.warning("packing texts does not work for this model (%s: %s); serving padded batches",
                           type(error).__name__, error)
            return False
        tolerance = 1e-4 if self.dtype == torch.float32 else 3e-2
        scale = padded.abs().max().clamp(min=1.0)
        if not torch.allclose(packed / scale, padded / scale, atol=tolerance, rtol=0):
            logger.warning("packed texts do not get the padded batch's vectors for this model (positions or "
                           "attention differ); serving padded batches")
            return False
        return True


def resolve_embedding_len(requested: int | None, config, tokenizer, model_path: str) -> int:
    """Longest input in tokens: ``option.max_model_len``, else the sentence-transformers
    ``max_seq_length``, the tokenizer's limit or the model's positions, whichever is least."""
    text_config = config.get_text_config()
    limit = int(getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", 512))
    if requested is not None:
        if requested > limit:
            raise ConfigError(f"option.max_model_len={requested} exceeds the model's max_position_embeddings ({limit})")
        return requested
    candidates = [limit]
    if 0 < (tokenizer.model_max_length or 0) < _NO_TOKENIZER_LIMIT:
        candidates.append(int(tokenizer.model_max_length))
    settings = Path(model_path, _ST_SETTINGS)
    if settings.is_file():
        max_seq_length = json.loads(settings.read_text()).get("max_seq_length")
        if max_seq_length:
            candidates.append(int(max_seq_length))
    return min(candidates)

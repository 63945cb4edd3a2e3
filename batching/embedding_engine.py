"""The embedding engine: server-side dynamic batching of texts across requests.

It drives the project's ``DynamicBatcher`` (the strategy of ``batch_size`` / ``max_batch_delay``):
each text of each request is a ``Sequence`` with no tokens to generate; a batch forms when
``batch_size`` texts wait or the oldest has waited ``max_batch_delay``, runs through the model in
one forward (packed without padding where the model allows), and every text's vector goes back
to its request. The thread, the inbox, the queue limit (``job_queue_size`` texts, 503 beyond) and
the failure rule mirror ``batching.engine``: a batch that fails is retried text by text, so one
bad request never fails the others.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from batching.dynamic import DynamicBatcher
from batching.embedding_model import EmbeddingModel
from batching.inbox import EngineThread
from batching.prompt_bound import PromptSizeBound
from batching.scheduler import SchedulerConfig
from batching.sequence import Sequence
from djl_like.errors import (BadRequestError, ConfigError, DeviceOutOfMemoryError, LmiError, ModelError, RequestTimeoutError,
                             ServiceUnavailableError)
from djl_like.protocol import FinishReason, GenerationParams

logger = logging.getLogger(__name__)
_request_ids = itertools.count()
# An embedding generates nothing: its worst-case length is its prompt.
EMBEDDING_PARAMS = GenerationParams(max_new_tokens=0)


class EmbeddingHandle:
    """One request's texts in the engine: ``result()`` waits for every vector (input order) or
    raises the request's ``LmiError``; ``abort()`` drops the texts not embedded yet."""

    def __init__(self, engine: "EmbeddingEngine", request_id: str, token_ids: list[list[int]]):
        self.engine = engine
        self.request_id = request_id
        self.num_tokens = sum(len(ids) for ids in token_ids)
        self._vectors: list[torch.Tensor | None] = [None] * len(token_ids)
        self._missing = len(token_ids)
        self._error: LmiError | None = None
        self._done = threading.Event()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> list[list[float]]:
        """The vectors; raises ``RequestTimeoutError`` (and aborts) after ``timeout`` seconds."""
        if not self._done.wait(timeout):
            self.abort()
            raise RequestTimeoutError(f"no result within option.predict_timeout ({timeout:g} s); the request was aborted")
        if self._error is not None:
            raise self._error
        return [vector.tolist() for vector in self._vectors]

    def abort(self) -> None:
        if not self.finished:
            self.engine.abort(self)

    # ---- called by the engine thread --------------------------------------------------------
    def _set(self, index: int, vector: torch.Tensor) -> None:
        self._vectors[index] = vector
        self._missing -= 1
        if self._missing == 0:
            self._done.set()

    def _fail(self, error: LmiError) -> None:
        self._error = error
        self._done.set()


@dataclass
class _Text:
    """One text of a request, as the batcher sees it."""

    seq: Sequence
    handle: EmbeddingHandle
    index: int


class EmbeddingEngine(EngineThread):
    """Owns the embedding thread, its inbox and the texts in flight."""

    thread_name = "embedding-engine"

    def __init__(self, model: EmbeddingModel, *, batch_size: int, max_batch_delay_s: float,
                 job_queue_size: int = 1000, truncate: bool = False):
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_model_len = model.max_model_len
        self.batcher = DynamicBatcher(SchedulerConfig(
            max_num_seqs=batch_size, max_num_batched_tokens=batch_size * model.max_model_len,
            max_model_len=model.max_model_len, num_blocks=batch_size, block_size=model.max_model_len,
            max_batch_delay_s=max_batch_delay_s))
        self.job_queue_size = job_queue_size
        self.truncate = truncate
        self._exact, self._truncating = _tokenizers(model.tokenizer, model.max_model_len)
        self._size_bound = PromptSizeBound.of(self._exact)
        self._texts: dict[str, _Text] = {}
        self._init_thread()
        self._lock = threading.Lock()
        self._num_pending = 0  # texts submitted and not answered: guarded by _lock
        self.counters: Counter = Counter()
        self.batch_size_histogram: Counter = Counter()

    # ---- submission (any thread) ----------------------------------------------------------
    def submit(self, texts: list[str]) -> EmbeddingHandle:
        """Tokenize and queue ``texts``; never blocks on the model. Raises ``BadRequestError``
        (a text over the model's length without ``option.truncate``) or
        ``ServiceUnavailableError`` (queue full, engine stopped)."""
        if not self.is_healthy:
            raise ServiceUnavailableError("the embedding engine is not running")
        token_ids = self.encode(texts)
        self._reserve(len(token_ids))
        handle = EmbeddingHandle(self, f"emb-{next(_request_ids)}", token_ids)
        texts_in = [_Text(Sequence(ids, EMBEDDING_PARAMS, f"{handle.request_id}:{index}"), handle, index)
                    for index, ids in enumerate(token_ids)]
        self._inbox.post("add", texts_in)
        return handle

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, special tokens included; a text too long for the model is a
        400 naming it, or is cut to ``max_model_len`` tokens with ``option.truncate=true``."""
        if not self.truncate:
            for index, text in enumerate(texts):
                if self._size_bound.min_tokens(text) > self.max_model_len:
                    raise self._too_long(index, len(texts), f"at least {self._size_bound.min_tokens(text)}")
        # NOTE: encode_batch releases the GIL; both tokenizers are only ever read.
        encodings = self._exact.encode_batch(texts)
        ids = [encoding.ids for encoding in encodings]
        long = [index for index, text_ids in enumerate(ids) if len(text_ids) > self.max_model_len]
        if long and not self.truncate:
            raise self._too_long(long[0], len(texts), str(len(ids[long[0]])))
        for index, cut in zip(long, self._truncating.encode_batch([texts[index] for index in long])):
            ids[index] = cut.ids
        if any(not text_ids for text_ids in ids):
            raise BadRequestError("an input encodes to no tokens")
        return ids

    def _too_long(self, index: int, count: int, num_tokens: str) -> BadRequestError:
        field = "inputs" if count == 1 else f"inputs[{index}]"
        return BadRequestError(f"{field} is {num_tokens} tokens long, over the model's limit of {self.max_model_len} "
                               "tokens; shorten it, or set option.truncate=true to cut it")

    def _reserve(self, num_texts: int) -> None:
        if num_texts > self.job_queue_size:
            raise BadRequestError(f"{num_texts} inputs in one request; at most job_queue_size ({self.job_queue_size})")
        with self._lock:
            if self._num_pending + num_texts > self.job_queue_size:
                raise ServiceUnavailableError(f"the request queue is full ({self.job_queue_size} texts)")
            self._num_pending += num_texts

    def abort(self, handle: EmbeddingHandle) -> None:
        self._inbox.post("abort", handle)

    # ---- the thread ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop after the current batch; texts still waiting fail their requests with 503."""
        if not self._stop_thread():
            return
        self._drain_inbox()
        for text in list(self._texts.values()):
            self._fail(text.handle, ServiceUnavailableError("the server shut down before this request finished"))

    def _on_crash(self, error: BaseException) -> None:
        for text in list(self._texts.values()):
            text.handle._fail(ServiceUnavailableError(f"the embedding engine stopped: {error}"))

    def _drain_inbox(self) -> None:
        for kind, payload in self._inbox.drain():
            if kind == "add":
                for text in payload:
                    self._texts[text.seq.request_id] = text
                    self.batcher.add(text.seq)
            else:
                self._drop(payload, FinishReason.ABORT)

    # ---- one batch ------------------------------------------------------------------------------
    def step(self) -> None:
        """schedule -> embed -> emit; the batch's texts leave the batcher either way."""
        batch = [self._texts[item.seq.request_id] for item in self.batcher.schedule().scheduled]
        if not batch:
            return
        self._record(batch)
        try:
            vectors = self.model.embed([text.seq.prompt_token_ids for text in batch])
        except Exception:  # noqa: BLE001 - find the text that broke the batch, spare the rest
            logger.exception("a batch of %d texts failed; retrying them one by one", len(batch))
            for text in batch:
                self._embed_alone(text)
            return
        for text, vector in zip(batch, vectors):
            self._emit(text, vector)

    def _embed_alone(self, text: _Text) -> None:
        if text.seq.request_id not in self._texts:
            return  # its request failed on an earlier text of this batch
        try:
            vector = self.model.embed([text.seq.prompt_token_ids])[0]
        except Exception as error:  # noqa: BLE001 - the failure belongs to this request only
            logger.exception("request %s failed", text.handle.request_id)
            kind = DeviceOutOfMemoryError if isinstance(error, torch.OutOfMemoryError) else ModelError
            self._fail(text.handle, kind(f"the model failed on this request: {type(error).__name__}: {error}"))
            return
        self._emit(text, vector)

    def _emit(self, text: _Text, vector: torch.Tensor) -> None:
        self._finish(text, FinishReason.LENGTH)
        text.handle._set(text.index, vector)

    def _fail(self, handle: EmbeddingHandle, error: LmiError) -> None:
        self.counters[f"failed_{error.kind}"] += 1
        self._drop(handle, FinishReason.ERROR)
        handle._fail(error)

    def _drop(self, handle: EmbeddingHandle, reason: FinishReason) -> None:
        """Take every text of ``handle`` still in the engine out of it."""
        for text in [text for text in self._texts.values() if text.handle is handle]:
            self._finish(text, reason)

    def _finish(self, text: _Text, reason: FinishReason) -> None:
        if self._texts.pop(text.seq.request_id, None) is None:
            return
        self.batcher.finish(text.seq, reason)
        self.counters[f"texts_{reason.value}"] += 1
        with self._lock:
            self._num_pending -= 1

    def _record(self, batch: list[_Text]) -> None:
        self.counters["batches"] += 1
        self.counters["tokens"] += sum(text.seq.num_prompt_tokens for text in batch)
        self.batch_size_histogram[len(batch)] += 1

    def stats(self) -> dict:
        with self._lock:
            pending = self._num_pending
        return {"mode": "text-embedding", "healthy": self.is_healthy, "pooling": self.model.pooling,
                "normalize": self.model.normalize, "packed": self.model.packed, "dimension": self.model.dimension,
                "max_model_len": self.max_model_len, "batch_size": self.batcher.config.max_num_seqs,
                "texts_pending": pending, "batches": self.counters["batches"], "tokens": self.counters["tokens"],
                "texts_embedded": self.counters["texts_length"], "texts_aborted": self.counters["texts_abort"],
                "failed": {key.removeprefix("failed_"): value for key, value in self.counters.items()
                           if key.startswith("failed_")},
                "max_batch_size": max(self.batch_size_histogram, default=0),
                "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_size_histogram.items())}}


def _tokenizers(tokenizer, max_model_len: int) -> tuple[Tokenizer, Tokenizer]:
    """Two private copies of the model's Rust tokenizer: one that keeps every token (a
    tokenizer.json may set truncation or fixed padding: all-MiniLM-L6-v2's pads to 128), one that
    cuts at ``max_model_len`` keeping the special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"the model's tokenizer ({type(tokenizer).__name__}) is not a fast (tokenizers-backed) "
                          "tokenizer, which serving needs; add a tokenizer.json")
    exact = Tokenizer.from_str(backend.to_str())
    exact.no_padding()
    exact.no_truncation()
    truncating = Tokenizer.from_str(exact.to_str())
    truncating.enable_truncation(max_model_len)
    return exact, truncating


def create_embedding_engine(config, model_path: str) -> EmbeddingEngine:
    """Load the embedding model and build its engine (not started) from a ``ServingConfig``."""
    model = EmbeddingModel(model_path, dtype=config.dtype, device=config.device,
                           trust_remote_code=config.trust_remote_code, revision=config.revision,
                           pooling=config.pooling, normalize=config.normalize, max_model_len=config.max_model_len)
    return EmbeddingEngine(model, batch_size=config.batch_size, max_batch_delay_s=config.max_batch_delay_ms / 1000.0,
                           job_queue_size=config.job_queue_size, truncate=config.truncate)

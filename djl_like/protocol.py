"""Typed protocol shared by the HTTP layer and the engine.

``GenerationParams`` holds the LMI generation parameters with LMI's names and defaults;
``TokenOutput`` is what the engine emits per generated token; ``FinishReason`` spells the
``finish_reason`` values of LMI's ``details``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


# NOTE: vLLM's epsilon: below it, dividing logits by the temperature overflows float32 (inf,
# then NaN probabilities), and the distribution is a point mass anyway.
GREEDY_TEMPERATURE = 1e-5


class FinishReason(str, enum.Enum):
    """Why a request stopped. The first three reach clients in ``details.finish_reason``;
    ``abort`` (the request was cancelled) and ``error`` (the model failed on it) end requests
    whose clients get no generation, and are counted in ``/stats``."""

    LENGTH = "length"
    EOS = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    ABORT = "abort"
    ERROR = "error"


class AbortReason(str, enum.Enum):
    """Why a request was cancelled before it finished (``/stats`` counts each)."""

    CLIENT_DISCONNECTED = "client_disconnected"
    TIMEOUT = "timeout"  # no result within option.predict_timeout
    CANCELLED = "cancelled"  # its caller gave up on it (another prompt of its list failed ...)
    SHUTDOWN = "shutdown"  # the server stopped before it finished


@dataclass(frozen=True)
class GenerationParams:
    """Generation parameters of one prompt, validated (see ``djl_like.requests``)."""

    max_new_tokens: int = 30
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False
    details: bool = False
    return_full_text: bool = False
    decoder_input_details: bool = False
    # vLLM's SamplingParams.logprobs: None reports no log-probabilities beyond ``log_prob``; N
    # also reports each token decoded alone and the N likeliest tokens at its position.
    logprobs: int | None = None
    # OpenAI's logit_bias: (token id, bias) pairs added to the logits before sampling.
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature < GREEDY_TEMPERATURE


@dataclass(frozen=True)
class TokenLogProb:
    """A token decoded alone (special tokens spelled out) and the model's raw log-probability."""

    token_id: int
    text: str
    log_prob: float


@dataclass(frozen=True)
class TokenOutput:
    """One generated token as the engine emits it.

    ``text`` is the *new* text this token makes visible (may be empty while a multi-byte
    character or a possible stop sequence is held back); concatenating ``text`` over a request's
    outputs gives its generated text exactly. ``finish_reason`` is set on the last output only.
    """

    token_id: int
    text: str
    # The model's own log-probability of this token: log_softmax of the raw logits, before
    # penalties, temperature and the top-k/top-p/min-p filters (vLLM's default).
    log_prob: float
    finish_reason: FinishReason | None = None
    # Set on the last output only: number of prompt tokens, for usage reports.
    num_prompt_tokens: int | None = None
    # Set when the request asked for ``logprobs``: this token decoded alone, and the
    # ``params.logprobs`` likeliest tokens at its position (most likely first).
    sampled: TokenLogProb | None = None
    top_logprobs: tuple[TokenLogProb, ...] = ()


@dataclass
class GenerationResult:
    """A finished generation, assembled from its ``TokenOutput`` stream by the route."""

    prompt: str
    tokens: list[TokenOutput] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.tokens[-1].finish_reason if self.tokens else None

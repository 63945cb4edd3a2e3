"""Benchmark workloads: deterministic lists of (prompt, max_new_tokens) with the load and the
server settings each one assumes.

Every workload is a pure function of its arguments (name, seed, scale, request count and an
optional tokenizer): the same call gives the same prompts, so every strategy and every offline
peer of a comparison sees exactly the same requests. With a tokenizer, prompt lengths are exact
token counts; without one (``lmi-bench run`` against a URL), a word stands in for a token.

- ``seed``: the AWS LMI blog's batching comparison. Three prompts with max_new_tokens 64, 128 and
  256, 50 concurrent clients. Measures scheduling (request level vs iteration level); the KV
  capacity is sized so that memory never limits it.
- ``memory-bound``: mixed prompt and output lengths at a small, fixed KV capacity. A contiguous
  strategy reserves ``max_model_len`` tokens per running sequence, so the capacity admits only
  ``capacity / max_model_len`` sequences; paging reserves what each sequence has computed, so the
  same memory holds several times more.
- ``shared-prefix``: a long common system prompt (hundreds of tokens) and short distinct
  questions. Prefix caching computes the system prompt once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# A tokenizer as far as workloads care: text -> token ids, token ids -> text.
Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]

# Three prompts in the shape of the AWS blog's Llama-2 batching comparison: short instructions
# whose answers are long (every request runs to max_new_tokens with ignore_eos anyway).
SEED_PROMPTS = (
    "The future of artificial intelligence is",
    "Write a short story about a robot who learns to paint. Once upon a time,",
    "Explain to a new engineer, step by step, how a large language model generates text "
    "one token at a time, and why serving many users at once is hard:",
)
SEED_MAX_NEW_TOKENS = (64, 128, 256)

# Plain English sentences to build prompts of any length from, deterministically.
FILLER_SENTENCES = (
    "The river bends twice before it reaches the old stone bridge near the market.",
    "Engineers measure latency in milliseconds and throughput in requests per second.",
    "A lighthouse keeper writes the weather into a notebook every evening at six.",
    "The recipe calls for two cups of flour, a pinch of salt and warm water.",
    "Trains leave the northern station every twenty minutes on weekdays.",
    "Memory that is reserved but never used is memory that another request could have had.",
    "The committee agreed to publish its findings before the end of the quarter.",
    "Bees visit thousands of flowers to make a single spoonful of honey.",
    "She packed a map, a compass and enough bread for three days in the hills.",
    "Every page of the ledger was signed by the clerk and stamped by the mayor.",
    "The orchestra tuned its instruments while the audience found their seats.",
    "A good cache keeps what will be asked for again and forgets the rest.",
    "Snow fell on the valley all night and the roads were closed by morning.",
    "The library lends books, maps, records and, on Saturdays, sewing machines.",
    "Sailors once navigated by the stars, the sun and the patience of the sea.",
    "The new bakery on the corner opens at dawn and sells out before noon.",
)

SHARED_PREFIX_QUESTIONS = (
    "What time does the store open on Sundays?",
    "How do I reset my password?",
    "Can I return an item without a receipt?",
    "Do you ship to Canada?",
    "Which payment methods do you accept?",
    "How long does delivery take?",
    "Is there a student discount?",
    "Where can I find my order number?",
    "Can I change my delivery address after ordering?",
    "Do gift cards expire?",
    "How do I cancel my subscription?",
    "Are your products covered by a warranty?",
)


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: the prompt text and its exact output length (ignore_eos)."""

    prompt: str
    max_new_tokens: int


@dataclass(frozen=True)
class Workload:
    """A named list of requests, the concurrency it is meant to run at, and the serving.properties
    values every strategy shares for it (same max_model_len and KV capacity for all)."""

    name: str
    requests: tuple[RequestSpec, ...]
    concurrency: int
    description: str
    server_options: Mapping[str, str] = field(default_factory=dict)

    @property
    def total_output_tokens(self) -> int:
        return sum(request.max_new_tokens for request in self.requests)

    def describe(self) -> dict:
        """JSON-ready summary (for result files)."""
        return {"name": self.name, "num_requests": len(self.requests), "concurrency": self.concurrency,
                "total_output_tokens": self.total_output_tokens, "description": self.description,
                "server_options": dict(self.server_options)}


def scaled(tokens: int, scale: float) -> int:
    """An output length shrunk by ``scale`` (at least one token)."""
    return max(1, int(round(tokens * scale)))


class PromptBuilder:
    """Builds prompts of an exact token count (with a tokenizer) or word count (without)."""

    def __init__(self, encode: Encode | None = None, decode: Decode | None = None):
        if (encode is None) != (decode is None):
            raise ValueError("give both encode and decode, or neither")
        self.encode, self.decode = encode, decode

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "PromptBuilder":
        """From a Hugging Face tokenizer (no special tokens: the server adds its own)."""
        return cls(lambda text: tokenizer.encode(text, add_special_tokens=False),
                   lambda ids: tokenizer.decode(ids, skip_special_tokens=True))

    def count(self, text: str) -> int:
        return len(self.encode(text)) if self.encode else len(text.split())

    def filler(self, num_tokens: int, rng: random.Random) -> str:
        """About ``num_tokens`` tokens of filler sentences, cut at a token (or word) boundary."""
        sentences = []
        while self.count(" ".join(sentences)) < num_tokens:
            sentences.append(rng.choice(FILLER_SENTENCES))
        text = " ".join(sentences)
        if self.encode is None:
            return " ".join(text.split()[:num_tokens])
        return self.decode(self.encode(text)[:num_tokens]).strip()


def fitting_max_model_len(requests: tuple[RequestSpec, ...], builder: PromptBuilder, multiple: int = 16) -> int:
    """The smallest max_model_len (a multiple of ``multiple``) that admits every request, with room
    for special tokens; without a tokenizer a word may be several tokens, so twice the words."""
    tokens_per_unit = 1 if builder.encode else 2
    longest = max((builder.count(r.prompt) * tokens_per_unit + r.max_new_tokens for r in requests), default=1)
    return -(-(longest + 8) // multiple) * multiple


# --- the workloads ---------------------------------------------------------------------------


def seed_workload(num_requests: int = 150, scale: float = 1.0, concurrency: int = 50,
                  builder: PromptBuilder | None = None, **_) -> Workload:
    """The AWS blog shape: the three prompts in turn, max_new_tokens 64/128/256 times ``scale``."""
    requests = tuple(RequestSpec(SEED_PROMPTS[i % 3], scaled(SEED_MAX_NEW_TOKENS[i % 3], scale))
                     for i in range(num_requests))
    # NOTE: capacity for every client at max_model_len, so no strategy is memory-bound here.
    max_model_len = fitting_max_model_len(requests, builder or PromptBuilder())
    return Workload("seed", requests, concurrency,
                    "three prompts, max_new_tokens 64/128/256 (x scale), closed loop",
                    {"option.max_model_len": str(max_model_len),
                     "option.max_kv_cache_tokens": str(concurrency * max_model_len),
                     "option.max_rolling_batch_size": str(concurrency),
                     "option.max_rolling_batch_prefill_tokens": "1024"})


# memory-bound: the capacity and length limit every strategy gets (tokens).
MEMORY_BOUND_MAX_MODEL_LEN = 512
MEMORY_BOUND_KV_CAPACITY = 2048  # = 4 contiguous slots of max_model_len
MEMORY_BOUND_PROMPT_TOKENS = (16, 160)  # uniform range
MEMORY_BOUND_OUTPUT_TOKENS = (32, 192)  # uniform range, before scale


def memory_bound_workload(num_requests: int = 96, scale: float = 1.0, concurrency: int = 24, seed: int = 0,
                          builder: PromptBuilder | None = None, **_) -> Workload:
    """Mixed prompt lengths (16-160 tokens) and outputs (32-192 x scale) at 2,048 KV tokens and
    max_model_len 512: contiguous strategies run 4 sequences, paged ones about 2048/(mean length)."""
    builder = builder or PromptBuilder()
    rng = random.Random(seed)
    requests = []
    for _index in range(num_requests):
        prompt_tokens = rng.randint(*MEMORY_BOUND_PROMPT_TOKENS)
        output_tokens = scaled(rng.randint(*MEMORY_BOUND_OUTPUT_TOKENS), scale)
        requests.append(RequestSpec(builder.filler(prompt_tokens, rng), output_tokens))
    return Workload("memory-bound", tuple(requests), concurrency,
                    f"prompts {MEMORY_BOUND_PROMPT_TOKENS[0]}-{MEMORY_BOUND_PROMPT_TOKENS[1]} tokens, outputs "
                    f"{MEMORY_BOUND_OUTPUT_TOKENS[0]}-{MEMORY_BOUND_OUTPUT_TOKENS[1]} x scale, "
                    f"KV capacity {MEMORY_BOUND_KV_CAPACITY} tokens, max_model_len {MEMORY_BOUND_MAX_MODEL_LEN}",
                    {"option.max_model_len": str(MEMORY_BOUND_MAX_MODEL_LEN),
                     "option.max_kv_cache_tokens": str(MEMORY_BOUND_KV_CAPACITY),
                     "option.max_rolling_batch_size": str(concurrency),
                     "option.max_rolling_batch_prefill_tokens": "1024"})


SHARED_PREFIX_SYSTEM_TOKENS = 480


def shared_prefix_workload(num_requests: int = 48, scale: float = 1.0, concurrency: int = 8, seed: int = 0,
                           builder: PromptBuilder | None = None, **_) -> Workload:
    """A 480-token system prompt shared by every request, then a short distinct question;
    32 x scale new tokens each."""
    builder = builder or PromptBuilder()
    rng = random.Random(seed)
    system = ("You are the help desk of a small shop. Answer in one short paragraph. Background: "
              + builder.filler(SHARED_PREFIX_SYSTEM_TOKENS, rng))
    requests = tuple(RequestSpec(f"{system}\nQuestion {i}: {SHARED_PREFIX_QUESTIONS[i % len(SHARED_PREFIX_QUESTIONS)]}"
                                 "\nAnswer:", scaled(32, scale))
                     for i in range(num_requests))
    max_model_len = fitting_max_model_len(requests, builder)
    return Workload("shared-prefix", requests, concurrency,
                    f"{SHARED_PREFIX_SYSTEM_TOKENS}-token common system prompt + short distinct questions, "
                    "32 new tokens x scale",
                    {"option.max_model_len": str(max_model_len),
                     "option.max_kv_cache_tokens": str(concurrency * max_model_len),
                     "option.max_rolling_batch_size": str(concurrency),
                     "option.max_rolling_batch_prefill_tokens": "1024"})


PEERS_PROMPT_TOKENS = 50
PEERS_OUTPUT_TOKENS = 64


def peers_workload(num_requests: int = 64, scale: float = 1.0, concurrency: int = 8, seed: int = 0,
                   builder: PromptBuilder | None = None, **_) -> Workload:
    """The side-by-side run against other servers: distinct ~50-token prompts (no prefix-cache
    luck for anyone), 64 new tokens x scale each, greedy with ignore_eos."""
    builder = builder or PromptBuilder()
    rng = random.Random(seed)
    # The numbered opening keeps every prompt distinct from its first tokens.
    requests = tuple(RequestSpec(f"Note {i}: " + builder.filler(PEERS_PROMPT_TOKENS - 4, rng),
                                 scaled(PEERS_OUTPUT_TOKENS, scale)) for i in range(num_requests))
    max_model_len = fitting_max_model_len(requests, builder)
    return Workload("peers", requests, concurrency,
                    f"distinct {PEERS_PROMPT_TOKENS}-token prompts, {PEERS_OUTPUT_TOKENS} new tokens x scale, closed loop",
                    {"option.max_model_len": str(max_model_len),
                     "option.max_kv_cache_tokens": str(concurrency * max_model_len),
                     "option.max_rolling_batch_size": str(concurrency),
                     "option.max_rolling_batch_prefill_tokens": "1024"})


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "seed": seed_workload,
    "peers": peers_workload,
    "memory-bound": memory_bound_workload,
    "shared-prefix": shared_prefix_workload,
}


def build_workload(name: str, *, num_requests: int | None = None, scale: float = 1.0,
                   concurrency: int | None = None, seed: int = 0, tokenizer=None) -> Workload:
    """The workload ``name`` with its defaults, overridden where an argument is given.

    ``scale`` multiplies output lengths (never prompt lengths: they define the workload's memory
    and prefix shape). ``tokenizer`` (a Hugging Face tokenizer) makes prompt lengths exact.
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of: {', '.join(WORKLOADS)}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    overrides = {key: value for key, value in
                 (("num_requests", num_requests), ("concurrency", concurrency)) if value is not None}
    builder = PromptBuilder.from_tokenizer(tokenizer) if tokenizer is not None else None
    return WORKLOADS[name](scale=scale, seed=seed, builder=builder, **overrides)

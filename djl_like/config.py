"""Typed, frozen serving configuration built from serving.properties keys.

The second config layer: ``ServingConfig.from_properties`` turns the flat ``dict[str, str]`` of
``djl_like.properties`` into checked values. Every invalid value raises ``ConfigError`` naming the
key, the value and what is allowed; unknown keys are kept and warned about, never fatal.
Validation has no side effects: nothing here reads the hardware or the environment. Values that
depend on the hardware (KV block count, what ``tensor_parallel_degree=max`` means) are resolved
by the model runner.
"""

from __future__ import annotations

import difflib
import enum
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from djl_like.errors import ConfigError
from djl_like.properties import load_properties

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = "/opt/ml/model"
MEBIBYTE = 1024 * 1024
# Stored in ``tensor_parallel_degree`` for `max`: the runner replaces it with the GPU count.
ALL_DEVICES = -1


class Strategy(str, enum.Enum):
    """The batching strategy: which batcher the engine builds (see design.md)."""

    DYNAMIC = "dynamic"
    ROLLING = "rolling"
    PAGED = "paged"


class FrozenMapping(Mapping[str, str]):
    """A read-only, hashable, picklable ``str -> str`` mapping (a frozen dataclass field).

    ``types.MappingProxyType`` would be read-only too, but it can be neither hashed, pickled
    (spawned worker processes receive the config) nor deep-copied (``dataclasses.asdict``).
    """

    def __init__(self, items: Mapping[str, str] | None = None):
        self._items = dict(items or {})

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"FrozenMapping({self._items!r})"


@dataclass(frozen=True)
class ServingConfig:
    """Everything serving.properties (plus the environment) decides, checked and typed.

    Build it with ``from_properties`` or ``load_config``; direct construction (tests, offline
    ``generate()``) is not validated. ``explicit`` names the fields the user set, so code can
    tell a default from a choice; ``unknown`` keeps keys no component reads.
    """

    model_dir: str = DEFAULT_MODEL_DIR
    model_id: str | None = None
    revision: str | None = None
    entry_point: str | None = None
    engine: str = "Python"  # Python | MPI; both run the same engine here
    strategy: Strategy = Strategy.PAGED
    batch_size: int = 1
    max_batch_delay_ms: int = 100
    job_queue_size: int = 1000
    num_workers: int = 1
    max_rolling_batch_size: int = 32
    max_rolling_batch_prefill_tokens: int = 4096
    max_model_len: int | None = None  # None: from the model config
    dtype: str = "auto"  # auto | fp32 | fp16 | bf16
    quantize: str | None = None  # int8 | int4: weight-only, CPU (batching.quantize)
    device: str | None = None  # cpu | cuda | None: cuda when available
    tensor_parallel_degree: int = 1  # ALL_DEVICES (-1) for `max`
    trust_remote_code: bool = False
    enable_prefix_caching: bool = False
    # Render plain-text `inputs` as one user message with the tokenizer's chat template, so an
    # instruct model answers a bare question (on by default for the embedded default model).
    apply_chat_template: bool = False
    block_size: int = 16
    max_kv_cache_tokens: int | None = None  # None: from device memory (GPU) or a CPU default
    gpu_memory_utilization: float = 0.9
    output_formatter: str = "json"  # json | jsonlines | sse
    # The model's name in OpenAI answers, /v1/models and metric labels; None: the folder's name.
    served_model_name: str | None = None
    task: str | None = None  # text-generation | text-embedding; None: from the architecture
    # Custom code (option.entryPoint, or a model.py in the model folder): the function to call,
    # and whether the folder's requirements.txt is pip-installed at start (a supply-chain risk).
    handler: str = "handle"
    install_requirements: bool = False
    # Text embedding: None takes the sentence-transformers pooling config, else the architecture's.
    pooling: str | None = None  # mean | cls | last | max | mean_sqrt_len
    normalize: bool = True
    truncate: bool = False  # cut inputs longer than the model's limit instead of refusing them
    predict_timeout_s: float = 120.0
    cpu_threads: int | None = None  # CPU threads per model copy; None: the host's cores / copies
    max_payload_bytes: int = 6 * MEBIBYTE
    port: int = 8080
    unknown: Mapping[str, str] = field(default_factory=FrozenMapping)
    explicit: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # Normalise container types so hand-built configs stay hashable and immutable too.
        object.__setattr__(self, "strategy", Strategy(self.strategy))
        object.__setattr__(self, "unknown", FrozenMapping(self.unknown))
        object.__setattr__(self, "explicit", frozenset(self.explicit))

    @classmethod
    def from_properties(
        cls, props: Mapping[str, str], *, model_dir: str | os.PathLike[str] = DEFAULT_MODEL_DIR
    ) -> ServingConfig:
        """Validate ``props`` (serving.properties keys) and build the config.

        Raises ``ConfigError`` on the first invalid value or conflicting combination. Logs one
        warning listing the unknown keys, which are kept in ``unknown``.
        """
        values = _parse_fields(props)
        strategy = choose_strategy(props)
        _check_prefix_caching(props, strategy)
        return cls(
            model_dir=os.fspath(model_dir),
            strategy=strategy,
            num_workers=_num_workers(props),
            unknown=_unknown_properties(props),
            explicit=_explicit_fields(props),
            **values,
        )


def served_model_name(config: ServingConfig, model_path: str) -> str:
    """``option.served_model_name``, else the name of the model's folder (the last part of
    ``option.model_id`` when set: a local path, an S3 prefix or a Hugging Face id)."""
    if config.served_model_name:
        return config.served_model_name
    return os.path.basename(os.path.normpath(config.model_id or model_path)) or model_path


def load_config(model_dir: str | os.PathLike[str], env: Mapping[str, str]) -> ServingConfig:
    """Read ``model_dir``/serving.properties, apply ``env`` (the file wins) and validate."""
    return ServingConfig.from_properties(load_properties(model_dir, env), model_dir=model_dir)


# --- value parsers: each takes (key, raw value) and returns the typed value or raises ---------

Parser = Callable[[str, str], Any]
_INTEGER = re.compile(r"[+-]?\d+")


def _invalid(key: str, raw: str, problem: str, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={raw!r} {problem}; {allowed}")


def _integer(minimum: int, maximum: int | None = None) -> Parser:
    allowed = f"expected an integer >= {minimum}" if maximum is None else (
        f"expected an integer from {minimum} to {maximum}")

    def parse(key: str, raw: str) -> int:
        # NOTE: int() would also take "1_000" and " 7 "; a config value is digits or wrong.
        if not _INTEGER.fullmatch(raw):
            raise _invalid(key, raw, "is not an integer", allowed)
        value = int(raw)
        if value < minimum or (maximum is not None and value > maximum):
            raise _invalid(key, raw, "is out of range", allowed)
        return value

    return parse


def _positive_number(maximum: float | None = None) -> Parser:
    allowed = "expected a number > 0" + ("" if maximum is None else f" and <= {maximum:g}")

    def parse(key: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise _invalid(key, raw, "is not a number", allowed) from None
        if not math.isfinite(value) or value <= 0 or (maximum is not None and value > maximum):
            raise _invalid(key, raw, "is out of range", allowed)
        return value

    return parse


_positive_integer = _integer(1)


def _boolean(key: str, raw: str) -> bool:
    lowered = raw.lower()
    if lowered not in ("true", "false"):
        raise _invalid(key, raw, "is not a boolean", "expected true or false")
    return lowered == "true"


def _choice(options: Mapping[str, Any]) -> Parser:
    """Case-insensitive choice; ``options`` maps each accepted spelling to the stored value."""
    lookup = {spelling.lower(): value for spelling, value in options.items()}
    allowed = "choose one of: " + ", ".join(options)

    def parse(key: str, raw: str) -> Any:
        if raw.lower() not in lookup:
            raise _invalid(key, raw, "is not supported", allowed)
        return lookup[raw.lower()]

    return parse


def _text(key: str, raw: str) -> str:
    if not raw:
        raise _invalid(key, raw, "is empty", "expected a non-empty value")
    return raw


def _entry_point(key: str, raw: str) -> str | None:
    # NOTE: LMI configs often name a built-in handler module (djl_python.huggingface,
    # djl_python.vllm ...). Ours is the built-in handler, so such a value means "no custom code".
    if _text(key, raw).startswith("djl_python."):
        logger.info("%s=%s names an LMI built-in handler; using the built-in handler", key, raw)
        return None
    return raw


def _tensor_parallel_degree(key: str, raw: str) -> int:
    if raw.lower() == "max":
        return ALL_DEVICES
    try:
        return _positive_integer(key, raw)
    except ConfigError:
        raise _invalid(key, raw, "is not valid", "expected max or an integer >= 1") from None


def _megabytes(key: str, raw: str) -> int:
    return _positive_integer(key, raw) * MEBIBYTE


def _chunked_prefill(key: str, raw: str) -> bool:
    # NOTE: accepted for LMI/vLLM configs, which set it; prefill is always chunked here, so
    # `false` would be a promise the server does not keep.
    if not _boolean(key, raw):
        raise _invalid(key, raw, "is not supported",
                       "rolling and paged batching always split a prompt longer than "
                       "option.max_rolling_batch_prefill_tokens into chunks; remove the key or "
                       "set it to true")
    return True


# --- the known keys ------------------------------------------------------------------------


ROLLING_BATCH_NAMES = ("auto", "scheduler", "lmi-dist", "vllm", "disable")
# LMI's engines that always page their KV cache; both run our paged batcher.
_PAGED_ENGINES = ("lmi-dist", "vllm")


# Accepted spellings of the embedding pooling modes (lasttoken is DJL's name for last).
POOLING_NAMES = {"mean": "mean", "cls": "cls", "last": "last", "lasttoken": "last", "max": "max",
                 "mean_sqrt_len": "mean_sqrt_len"}


class _Key(NamedTuple):
    field: str | None  # the ServingConfig field it sets; None: read by a combining function
    parse: Parser


_KEYS: dict[str, _Key] = {
    # Server level.
    "engine": _Key("engine", _choice({"Python": "Python", "MPI": "MPI"})),
    "batch_size": _Key("batch_size", _positive_integer),
    "option.cpu_threads": _Key("cpu_threads", _positive_integer),
    "max_batch_delay": _Key("max_batch_delay_ms", _integer(0)),
    "job_queue_size": _Key("job_queue_size", _positive_integer),
    "minWorkers": _Key(None, _positive_integer),
    "maxWorkers": _Key(None, _positive_integer),
    "port": _Key("port", _integer(1, 65535)),
    "max_payload_mb": _Key("max_payload_bytes", _megabytes),
    # Model options.
    "option.model_id": _Key("model_id", _text),
    "option.revision": _Key("revision", _text),
    "option.entryPoint": _Key("entry_point", _entry_point),
    "option.rolling_batch": _Key(None, _choice({name: name for name in ROLLING_BATCH_NAMES})),
    "option.paged_attention": _Key(None, _boolean),
    "option.max_rolling_batch_size": _Key("max_rolling_batch_size", _positive_integer),
    "option.max_rolling_batch_prefill_tokens": _Key(
        "max_rolling_batch_prefill_tokens", _positive_integer),
    "option.max_model_len": _Key("max_model_len", _positive_integer),
    "option.dtype": _Key("dtype", _choice({
        "auto": "auto", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16",
        "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"})),
    "option.quantize": _Key("quantize", _choice({"int8": "int8", "int4": "int4", "none": None})),
    "option.device": _Key("device", _choice({"auto": None, "cpu": "cpu", "cuda": "cuda"})),
    "option.tensor_parallel_degree": _Key("tensor_parallel_degree", _tensor_parallel_degree),
    "option.trust_remote_code": _Key("trust_remote_code", _boolean),
    "option.enable_prefix_caching": _Key("enable_prefix_caching", _boolean),
    "option.enable_chunked_prefill": _Key(None, _chunked_prefill),
    "option.apply_chat_template": _Key("apply_chat_template", _boolean),
    "option.block_size": _Key("block_size", _integer(1, 1024)),
    "option.max_kv_cache_tokens": _Key("max_kv_cache_tokens", _positive_integer),
    "option.gpu_memory_utilization": _Key("gpu_memory_utilization", _positive_number(1.0)),
    "option.output_formatter": _Key("output_formatter", _choice(
        {"json": "json", "jsonlines": "jsonlines", "sse": "sse"})),
    "option.served_model_name": _Key("served_model_name", _text),
    # feature-extraction is what Hugging Face containers call embedding (HF_TASK).
    "option.task": _Key("task", _choice({
        "text-generation": "text-generation", "text-embedding": "text-embedding",
        "feature-extraction": "text-embedding"})),
    "option.predict_timeout": _Key("predict_timeout_s", _positive_number()),
    "option.handler": _Key("handler", _text),
    "option.install_requirements": _Key("install_requirements", _boolean),
    # LMI's embedding engines read pooling and normalize without the option. prefix; both work,
    # and the option. spelling wins when both are set (it comes later here).
    "pooling": _Key("pooling", _choice(POOLING_NAMES)),
    "option.pooling": _Key("pooling", _choice(POOLING_NAMES)),
    "normalize": _Key("normalize", _boolean),
    "option.normalize": _Key("normalize", _boolean),
    "option.truncate": _Key("truncate", _boolean),
}
_STRATEGY_KEYS = ("batch_size", "option.rolling_batch", "option.paged_attention")
_WORKER_KEYS = ("minWorkers", "maxWorkers")


def _read(props: Mapping[str, str], key: str, default: Any) -> Any:
    """The parsed value of ``key``, or ``default`` when it is not set."""
    if key not in props:
        return default
    return _KEYS[key].parse(key, props[key].strip())


def _parse_fields(props: Mapping[str, str]) -> dict[str, Any]:
    """Parse every known key that is set (so each is validated) and return the field values."""
    parsed = {key: _read(props, key, None) for key in _KEYS if key in props}
    return {_KEYS[key].field: value for key, value in parsed.items() if _KEYS[key].field}


# --- combinations of keys --------------------------------------------------------------------


def choose_strategy(props: Mapping[str, str]) -> Strategy:
    """Pick the batching strategy from ``batch_size``, ``option.rolling_batch`` and
    ``option.paged_attention``, as LMI does.

    ``batch_size > 1`` selects dynamic batching whatever ``rolling_batch`` says (a warning is
    logged when the user set another rolling value); ``rolling_batch=disable`` is dynamic too
    (``batch_size=1``: no batching); ``lmi-dist``/``vllm`` are paged; ``auto``/``scheduler`` are
    paged unless ``paged_attention=false``. Raises ``ConfigError`` on invalid values or when
    ``paged_attention=false`` is combined with a paged-only engine.
    """
    batch_size = _read(props, "batch_size", 1)
    rolling_batch = _read(props, "option.rolling_batch", "auto")
    paged_attention = _read(props, "option.paged_attention", True)
    if batch_size > 1:
        if rolling_batch != "disable":
            _warn_batch_size_wins(props)
        return Strategy.DYNAMIC
    if rolling_batch == "disable":
        return Strategy.DYNAMIC
    if rolling_batch in _PAGED_ENGINES and not paged_attention:
        raise ConfigError(
            f"option.paged_attention={props['option.paged_attention']!r} conflicts with "
            f"option.rolling_batch={props['option.rolling_batch']!r}: lmi-dist and vllm always "
            "use paged attention; remove option.paged_attention, or set "
            "option.rolling_batch=auto (or scheduler) for contiguous rolling batching")
    return Strategy.PAGED if paged_attention else Strategy.ROLLING


def _warn_batch_size_wins(props: Mapping[str, str]) -> None:
    if "option.rolling_batch" in props:
        logger.warning(
            "batch_size=%s selects dynamic batching; option.rolling_batch=%s is ignored "
            "(batch_size wins, as in LMI)", props["batch_size"], props["option.rolling_batch"])


def _check_prefix_caching(props: Mapping[str, str], strategy: Strategy) -> None:
    if strategy is Strategy.PAGED or not _read(props, "option.enable_prefix_caching", False):
        return
    raise ConfigError(
        f"option.enable_prefix_caching={props['option.enable_prefix_caching']!r} needs paged "
        f"attention, but this configuration selects {strategy.value} batching; remove it, or use "
        "batch_size=1 with option.rolling_batch=auto and option.paged_attention=true")


def _num_workers(props: Mapping[str, str]) -> int:
    # NOTE: DJL scales between minWorkers and maxWorkers under load; we start a fixed number of
    # copies, and the user has declared that maxWorkers copies fit, so we start that many.
    min_workers = _read(props, "minWorkers", None)
    max_workers = _read(props, "maxWorkers", None)
    if min_workers is not None and max_workers is not None and min_workers > max_workers:
        raise ConfigError(
            f"minWorkers={props['minWorkers']!r} is greater than maxWorkers="
            f"{props['maxWorkers']!r}; expected minWorkers <= maxWorkers")
    return max_workers or min_workers or 1


def _unknown_properties(props: Mapping[str, str]) -> FrozenMapping:
    unknown = {key: value for key, value in props.items() if key not in _KEYS}
    if unknown:
        # Names only: values of other engines' keys may hold tokens or credentials.
        logger.warning("ignoring unknown serving.properties keys (kept, not used): %s",
                       ", ".join(_describe_unknown(key) for key in sorted(unknown)))
    return FrozenMapping(unknown)


def _describe_unknown(key: str) -> str:
    close = difflib.get_close_matches(key, _KEYS, n=1, cutoff=0.85)
    return f"{key} (did you mean {close[0]}?)" if close else key


def _explicit_fields(props: Mapping[str, str]) -> frozenset[str]:
    fields = {spec.field for key, spec in _KEYS.items() if key in props and spec.field}
    if any(key in props for key in _STRATEGY_KEYS):
        fields.add("strategy")
    if any(key in props for key in _WORKER_KEYS):
        fields.add("num_workers")
    return frozenset(fields)

"""serving.properties and environment variables -> one flat ``dict[str, str]``.

The first of the three config layers (see ``djl_like.config`` for the typed layer): it only
reads text and renames keys; it never judges values. A key written in serving.properties wins
over the environment variable that maps to it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

from djl_like.errors import ConfigError

PROPERTIES_FILE = "serving.properties"

# Java's split rule: the key ends at the first '=', ':' or whitespace; then optional
# whitespace, at most one '=' or ':', optional whitespace, and the rest is the value.
_ENTRY = re.compile(r"(?P<key>[^=:\s]+)\s*[=:]?\s*(?P<value>.*)", re.DOTALL)
# Java ends lines at \n, \r or \r\n only (str.splitlines also splits at \f, \x1c, \u2028 ...).
_LINE_BREAK = re.compile(r"\r\n|\r|\n")

# Server-level SERVING_<NAME> variables whose key is camelCase in serving.properties.
_SERVING_NAMES = {"MIN_WORKERS": "minWorkers", "MAX_WORKERS": "maxWorkers"}
# OPTION_<NAME> variables that do not follow the lower-casing rule.
_OPTION_NAMES = {"entrypoint": "option.entryPoint", "engine": "engine"}
# DJL reads SERVING_OPTS as JVM options, not as a property: mapping it would only produce a
# spurious unknown-key warning.
_SERVING_NOT_PROPERTIES = frozenset({"OPTS"})

# Alias variables, lowest priority first: a later entry overrides an earlier one, and every
# OPTION_/SERVING_ variable (the LMI names) overrides them all.
_ALIASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # TGI names; SM_NUM_GPUS is the platform-wide GPU count, TENSOR_PARALLEL_DEGREE the user's.
    ("SM_NUM_GPUS", ("option.tensor_parallel_degree",)),
    ("TENSOR_PARALLEL_DEGREE", ("option.tensor_parallel_degree",)),
    ("MAX_BATCH_SIZE", ("option.max_rolling_batch_size",)),
    ("MAX_CONCURRENT_REQUESTS", ("job_queue_size",)),
    ("MAX_BATCH_PREFILL_TOKENS", ("option.max_rolling_batch_prefill_tokens",)),
    # SageMaker hosting; SAGEMAKER_MODEL_SERVER_WORKERS is the documented name, so it wins.
    ("SAGEMAKER_NUM_MODEL_WORKERS", ("minWorkers", "maxWorkers")),
    ("SAGEMAKER_MODEL_SERVER_WORKERS", ("minWorkers", "maxWorkers")),
    ("SAGEMAKER_BIND_TO_PORT", ("port",)),
    ("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS", ("option.predict_timeout",)),
    ("SAGEMAKER_MAX_PAYLOAD_IN_MB", ("max_payload_mb",)),
    # Hugging Face hub names.
    ("HF_MODEL_ID", ("option.model_id",)),
    ("HF_REVISION", ("option.revision",)),
    ("HF_TASK", ("option.task",)),
    ("HF_MODEL_TRUST_REMOTE_CODE", ("option.trust_remote_code",)),
    # DJL Serving's own name for the custom handler file (OPTION_ENTRYPOINT wins over it).
    ("DJL_ENTRY_POINT", ("option.entryPoint",)),
)


def parse_properties(text: str) -> dict[str, str]:
    """Parse Java-properties text into a dict; later duplicates win.

    Supported: ``#`` and ``!`` comment lines, blank lines, ``key=value``, ``key: value`` and
    ``key value``, whitespace trimmed around key and value. Not supported (LMI configs do not use
    them): backslash escapes and line continuations. A ``#`` after a value is part of the value,
    as in Java.
    """
    props: dict[str, str] = {}
    for line in _LINE_BREAK.split(text.removeprefix("\ufeff")):
        entry = _parse_line(line)
        if entry is not None:
            props[entry[0]] = entry[1]
    return props


def _parse_line(line: str) -> tuple[str, str] | None:
    stripped = line.strip()
    if not stripped or stripped[0] in "#!":
        return None
    match = _ENTRY.match(stripped)
    if match is None:  # a line that is only a separator, e.g. "=value": no key to set
        return None
    return match["key"], match["value"].strip()


def read_properties(model_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Read ``<model_dir>/serving.properties``; an empty dict when there is no such file.

    Raises ``ConfigError`` when the file is not UTF-8 text.
    """
    path = os.path.join(os.fspath(model_dir), PROPERTIES_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as file:
            return parse_properties(file.read())
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text: {error}") from error


def properties_from_environment(env: Mapping[str, str]) -> dict[str, str]:
    """Map LMI, TGI, SageMaker and Hugging Face environment variables to property keys.

    ``OPTION_<NAME>`` -> ``option.<name>`` (all-caps names lower-cased, mixed case kept),
    ``SERVING_<NAME>`` -> server-level keys, and the alias variables of ``_ALIASES``, which count
    only when the LMI variable for the same key is unset. Empty values count as unset. Other
    variables are ignored. Pure: reads only ``env``.
    """
    props = _alias_properties(env)
    for name, value in _set_variables(env):
        key = _prefixed_key(name)
        if key is not None:
            props[key] = value
    return props


def _set_variables(env: Mapping[str, str]) -> Iterable[tuple[str, str]]:
    # NOTE: `docker run -e NAME=` leaves an empty value; treating it as unset keeps a blank
    # template variable from overriding a default with "".
    for name, value in env.items():
        if value.strip():
            yield name, value.strip()


def _alias_properties(env: Mapping[str, str]) -> dict[str, str]:
    set_variables = dict(_set_variables(env))
    props: dict[str, str] = {}
    for variable, keys in _ALIASES:
        if variable in set_variables:
            props.update(dict.fromkeys(keys, set_variables[variable]))
    return props


def _prefixed_key(variable: str) -> str | None:
    prefix, _, name = variable.partition("_")
    if not name:
        return None
    if prefix == "OPTION":
        return _OPTION_NAMES.get(name.lower(), "option." + _case_rule(name))
    if prefix == "SERVING" and name not in _SERVING_NOT_PROPERTIES:
        return _SERVING_NAMES.get(name, _case_rule(name))
    return None


def _case_rule(name: str) -> str:
    # All-caps is the shell convention and means "lower-case it"; a mixed-case name was typed
    # deliberately (OPTION_entryPoint) and is kept as written.
    return name.lower() if name.isupper() else name


def merge_properties(file_props: Mapping[str, str], env_props: Mapping[str, str]) -> dict[str, str]:
    """Combine both sources into a new dict; a key of serving.properties beats the environment."""
    return {**env_props, **file_props}


def load_properties(model_dir: str | os.PathLike[str], env: Mapping[str, str]) -> dict[str, str]:
    """Read serving.properties from ``model_dir``, map ``env``, and merge them (file wins)."""
    return merge_properties(read_properties(model_dir), properties_from_environment(env))

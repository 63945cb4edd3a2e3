"""Pooling token states into one embedding per text, and the pooling a model folder asks for.

Modes use LMI's names: ``mean`` (over every token the model saw, special tokens included, as
sentence-transformers does), ``cls`` (the first token), ``last`` (the last token: decoder models
used as embedders), ``max`` and ``mean_sqrt_len``. A sentence-transformers folder (``modules.json``
with a ``Pooling`` module) says which one it was trained with; modules this server does not apply
(``Dense`` ...) are refused at load rather than silently skipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from djl_like.errors import ConfigError

POOLING_MODES = ("mean", "cls", "last", "max", "mean_sqrt_len")
_ST_MODULES = "modules.json"
_ST_MODULE_PREFIX = "sentence_transformers.models."
# Modules after pooling that leave the vector as it is, or that `normalize` stands for.
_NEUTRAL_MODULES = frozenset({"Transformer", "Pooling", "Normalize"})
# sentence-transformers Pooling config flag -> our mode.
_ST_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last",
             "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}
_ST_UNSUPPORTED_FLAGS = ("pooling_mode_weightedmean_tokens",)


def pool(states: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector [hidden] from one text's token states [num_tokens, hidden]."""
    if mode == "mean":
        return states.mean(dim=0)
    if mode == "cls":
        return states[0]
    if mode == "last":
        return states[-1]
    if mode == "max":
        return states.max(dim=0).values
    if mode == "mean_sqrt_len":
        return states.sum(dim=0) / math.sqrt(states.shape[0])
    raise ValueError(f"unknown pooling mode {mode!r}; supported: {', '.join(POOLING_MODES)}")


def sentence_transformers_pooling(model_path: str | Path) -> str | None:
    """The pooling mode of a sentence-transformers folder, or None when it is not one.

    Raises ``ConfigError`` for a pipeline this server cannot reproduce (a ``Dense`` layer, weighted
    mean pooling, several pooled vectors concatenated ...).
    """
    modules_file = Path(model_path, _ST_MODULES)
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    kinds = {module.get("type", "").removeprefix(_ST_MODULE_PREFIX): module for module in modules}
    unsupported = sorted(set(kinds) - _NEUTRAL_MODULES)
    if unsupported:
        raise ConfigError(f"{modules_file} lists sentence-transformers modules this server does not apply: "
                          f"{', '.join(unsupported)}; serve a model whose pipeline is Transformer, Pooling (and Normalize)")
    if "Pooling" not in kinds:
        return None
    return _pooling_from_config(Path(model_path, kinds["Pooling"].get("path", ""), "config.json"))


def _pooling_from_config(config_file: Path) -> str | None:
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    if config.get("include_prompt") is False or any(config.get(flag) for flag in _ST_UNSUPPORTED_FLAGS):
        raise ConfigError(f"{config_file}: this pooling (weighted mean, or a prompt left out) is not supported; "
                          "set option.pooling to mean, cls, last, max or mean_sqrt_len to override it")
    modes = [mode for flag, mode in _ST_FLAGS.items() if config.get(flag)]
    if len(modes) > 1:
        raise ConfigError(f"{config_file} concatenates several poolings ({', '.join(modes)}), which this server "
                          "does not; set option.pooling to choose one")
    return modes[0] if modes else None

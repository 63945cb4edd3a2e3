"""Tiny random-weight models with a byte-level BPE tokenizer trained on local text, built in
seconds in a folder. No download."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The capital of France is Paris. The capital of Japan is Tokyo (東京).",
    "Continuous batching lets new requests join a running batch at every step.",
    "PagedAttention stores keys and values in blocks, like pages of virtual memory.",
    "Un café crème, s'il vous plaît. Größe, Übermaß, naïve façade, smørrebrød.",
    "日本語のテキストと絵文字 🚀🔥✨ も含めます。",
    "def forward(self, input_ids, position_ids):\n    return self.model(input_ids)\n",
    "Amazon SageMaker endpoints serve large language models with low latency.",
    "Once upon a time, a small model learned to count: one, two, three, four, five.",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(folder: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, architecture: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random-weight causal LM saved with safetensors next to its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    config = _config(architecture, len(tokenizer), tokenizer.eos_token_id, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)
    return folder


def _config(architecture: str, vocab_size: int, eos_token_id: int, **overrides):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, eos_token_id=eos_token_id, bos_token_id=eos_token_id, tie_word_embeddings=False)
    if architecture == "llama":
        return LlamaConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=512), **common, **overrides})
    if architecture == "qwen2":
        return Qwen2Config(**{**dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                                     num_key_value_heads=2, max_position_embeddings=512), **common, **overrides})
    if architecture == "gpt2":
        return GPT2Config(**{**dict(n_embd=64, n_layer=2, n_head=4, n_positions=512), **common, **overrides})
    raise ValueError(f"unknown test architecture {architecture!r}")


if __name__ == "__main__":
    import sys

    print(json.dumps(str(build_model(Path(sys.argv[1]), *(sys.argv[2:3] or ["llama"])))))

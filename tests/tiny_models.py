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


# Small but real shapes: grouped-query attention (4 query heads over 2 KV heads), head size 16.
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
# Windows shorter than the test prompts, so every windowed layer drops keys.
TEST_WINDOW = 8


def _config(architecture: str, vocab_size: int, eos_token_id: int, **overrides):
    import transformers as hf

    common = dict(vocab_size=vocab_size, eos_token_id=eos_token_id, bos_token_id=eos_token_id, pad_token_id=None,
                  tie_word_embeddings=False)
    alternating = ["sliding_attention", "full_attention"]
    configs = {
        "llama": (hf.LlamaConfig, _DECODER),
        "qwen2": (hf.Qwen2Config, {**_DECODER, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
                                   "num_attention_heads": 6}),
        "gpt2": (hf.GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)),
        # Sliding windows everywhere (Mistral-7B-style checkpoints set sliding_window).
        "mistral": (hf.MistralConfig, {**_DECODER, "sliding_window": TEST_WINDOW}),
        # Qwen2 with use_sliding_window: full attention below max_window_layers, windows above.
        "qwen2-sliding": (hf.Qwen2Config, {**_DECODER, "num_hidden_layers": 3, "use_sliding_window": True,
                                           "sliding_window": TEST_WINDOW, "max_window_layers": 1}),
        "qwen3": (hf.Qwen3Config, {**_DECODER, "head_dim": 16}),
        # Gemma 2: alternating window/full layers, logit softcapping small enough to bend these
        # random scores, query_pre_attn_scalar other than head_dim.
        "gemma2": (hf.Gemma2Config, {**_DECODER, "head_dim": 16, "sliding_window": TEST_WINDOW,
                                     "layer_types": alternating, "attn_logit_softcapping": 0.05,
                                     "query_pre_attn_scalar": 24}),
        "gemma3": (hf.Gemma3TextConfig, {**_DECODER, "head_dim": 16, "sliding_window": TEST_WINDOW,
                                         "layer_types": alternating, "query_pre_attn_scalar": 24}),
        "phi3": (hf.Phi3Config, {**_DECODER, "sliding_window": TEST_WINDOW}),
        "mixtral": (hf.MixtralConfig, {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}),
        # gpt-oss: attention sinks, alternating window/full layers, mixture of experts.
        "gpt_oss": (hf.GptOssConfig, {**_DECODER, "head_dim": 16, "sliding_window": TEST_WINDOW,
                                      "layer_types": alternating, "num_local_experts": 4, "num_experts_per_tok": 2}),
        # Refused: BLOOM adds an ALiBi bias in its own attention code; Falcon dispatches
        # attention itself.
        "bloom": (hf.BloomConfig, dict(hidden_size=64, n_layer=2, n_head=4)),
        "falcon": (hf.FalconConfig, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
    }
    if architecture not in configs:
        raise ValueError(f"unknown test architecture {architecture!r}")
    config_class, shape = configs[architecture]
    return config_class(**{**shape, **common, **overrides})


if __name__ == "__main__":
    import sys

    print(json.dumps(str(build_model(Path(sys.argv[1]), *(sys.argv[2:3] or ["llama"])))))

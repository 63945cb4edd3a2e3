"""``option.dtype=auto``: bf16 on CPUs that compute it natively, fp32 on the others, the
checkpoint's dtype on CUDA; and bf16 agrees with fp32 on a real model."""

from __future__ import annotations

import pytest
import torch

from batching.runner import pick_dtype, read_cpu_flags


class _Config:
    dtype = torch.float32


CPU = torch.device("cpu")


@pytest.mark.parametrize("flags,expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),  # AVX512-BF16 (Cooper Lake, Zen 4 ...)
    ({"avx2", "amx_bf16", "amx_tile"}, torch.bfloat16),  # AMX (Sapphire Rapids ...)
    ({"avx2", "fma"}, torch.float32),  # AVX2 only: bf16 would be emulated
    (set(), torch.float32),  # flags unknown
])
def test_auto_on_cpu_follows_the_cpu_features(flags, expected):
    assert pick_dtype("auto", CPU, _Config(), cpu_flags=frozenset(flags)) is expected


def test_an_explicit_dtype_wins_and_cuda_keeps_the_checkpoint_dtype():
    assert pick_dtype("fp32", CPU, _Config(), cpu_flags=frozenset({"avx512_bf16"})) is torch.float32
    half = type("HalfConfig", (), {"dtype": torch.float16})()
    assert pick_dtype("auto", torch.device("cuda"), half) is torch.float16
    assert pick_dtype("auto", torch.device("cuda"), _Config()) is torch.bfloat16


def test_this_machines_flags_are_read():
    flags = read_cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this platform")
    assert "fpu" in flags or "fp" in flags or "asimd" in flags  # every x86/ARM Linux lists one


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot",
           "Paged attention stores keys and values in"]


def agreement_with_fp32(lower, label: str) -> tuple[float, float]:
    """Teacher-forced over fp32's own greedy continuations of ``PROMPTS`` (16 tokens each) on the
    default model: the share of positions where ``lower`` picks fp32's top token, and the
    largest logit error relative to fp32's largest logit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from container.default_model import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    agree = total = 0
    errors = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            sequence = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=16, min_new_tokens=16)
            expected = reference(sequence).logits[0, ids.shape[1] - 1:-1]
            got = lower(sequence).logits[0, ids.shape[1] - 1:-1].float()
            agree += int((got.argmax(-1) == expected.argmax(-1)).sum())
            total += expected.shape[0]
            errors.append(float((got - expected).abs().max() / expected.abs().max()))
    print(f"{label} vs fp32: top-token agreement {agree / total:.3f} over {total} positions, "
          f"max relative logit error {max(errors):.3f}")
    return agree / total, max(errors)


def test_bf16_agrees_with_fp32_on_the_default_model():
    """(The engine's bf16 path equals the model's own bf16 forward within the load-time check's
    tolerance; this bounds what bf16 itself costs.)"""
    from transformers import AutoModelForCausalLM

    from container.default_model import default_model_path

    lower = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.bfloat16).eval()
    agreement, error = agreement_with_fp32(lower, "bf16")
    assert agreement >= 0.9
    assert error < 0.1

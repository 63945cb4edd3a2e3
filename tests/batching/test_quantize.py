"""``option.quantize``: weight-only int8 and int4 linear layers (batching/quantize.py).

What users rely on: the quantized layer computes the product with the dequantized weights; a
row's result does not depend on the other rows of its step; the engine serves a quantized model
exactly as the quantized model's own ``generate`` would (the correctness invariant, for the
quantized weights); bad settings are refused before loading; and each precision's distance from
the unquantized model on the default model is bounded (token agreement, logit error).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batching import quantize
from batching.engine import Engine
from batching.offline import create_engine
from batching.runner import ModelRunner
from djl_like.config import ServingConfig, Strategy
from djl_like.errors import ConfigError
from tests.batching.test_correctness import random_prompts, run_staggered
from tests.batching.test_dtype import agreement_with_fp32

CPU = torch.device("cpu")


def _linear(out_features: int, in_features: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def _int4_dequantized(linear: nn.Linear, group_size: int) -> torch.Tensor:
    """Independent reference of the int4 scheme: per group, 16 levels from min to max."""
    weight = linear.weight.detach().float()
    groups = weight.view(weight.shape[0], -1, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-12)
    return (torch.round((groups - low) / scale).clamp(0, 15) * scale + low).view_as(weight)


def test_int8_layer_computes_with_its_dequantized_weights():
    linear = _linear(48, 64)
    layer = quantize.Int8WeightOnlyLinear(linear)
    x = torch.randn(5, 3, 64)
    expected = x @ layer.dequantized().t() + linear.bias
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    # per-channel symmetric int8: each weight within half a step of the original
    step = linear.weight.abs().amax(1, keepdim=True) / 127
    assert ((layer.dequantized() - linear.weight).abs() <= step / 2 + 1e-7).all()


def test_int4_layer_computes_with_its_dequantized_weights():
    linear = _linear(32, 64, bias=False)
    layer = quantize.Int4WeightOnlyLinear(linear, group_size=32)
    x = torch.randn(4, 64)
    expected = x @ _int4_dequantized(linear, 32).t()
    assert torch.allclose(layer(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", quantize.SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_the_other_rows(scheme, dtype):
    linear = _linear(64, 96).to(dtype)
    layer = quantize.Int8WeightOnlyLinear(linear) if scheme == "int8" else quantize.Int4WeightOnlyLinear(linear)
    rows = torch.randn(16, 96, dtype=dtype)
    together = layer(rows)
    for i in (0, 7, 15):
        assert torch.equal(layer(rows[i:i + 1]), together[i:i + 1])


def test_layers_the_int4_kernel_cannot_take_stay_in_the_models_dtype():
    model = nn.Sequential(_linear(32, 64), _linear(24, 32), _linear(32, 40))  # 24 outputs, 40 inputs: no
    report = quantize.quantize_model(model, "int4")
    assert (report.layers_quantized, report.layers_kept) == (1, 2)
    assert isinstance(model[0], quantize.Int4WeightOnlyLinear)
    assert isinstance(model[1], nn.Linear) and isinstance(model[2], nn.Linear)
    assert report.bytes_after < report.bytes_before


def test_a_model_without_linear_layers_is_refused():
    with pytest.raises(ConfigError, match="no nn.Linear layer"):
        quantize.quantize_model(nn.Sequential(nn.Embedding(10, 4)), "int8")


def test_unsupported_settings_are_refused_before_loading():
    with pytest.raises(ConfigError, match="choose one of: int8, int4"):
        quantize.check_scheme("awq", CPU, 1)
    with pytest.raises(ConfigError, match="not supported on cuda"):
        quantize.check_scheme("int8", torch.device("cuda"), 1)
    with pytest.raises(ConfigError, match="tensor_parallel_degree"):
        quantize.check_scheme("int4", CPU, 2)
    quantize.check_scheme(None, torch.device("cuda"), 4)


def test_option_quantize_is_read_from_serving_properties():
    assert ServingConfig.from_properties({"option.quantize": "INT8"}).quantize == "int8"
    assert ServingConfig.from_properties({"option.quantize": "none"}).quantize is None
    assert ServingConfig.from_properties({}).quantize is None
    with pytest.raises(ConfigError, match="option.quantize='gptq'"):
        ServingConfig.from_properties({"option.quantize": "gptq"})


def test_weight_bytes_count_a_tied_table_once_and_quantized_buffers():
    model = nn.Module()
    model.embed = nn.Embedding(100, 16)
    model.head = nn.Linear(16, 100, bias=False)
    model.head.weight = model.embed.weight
    model.get_output_embeddings = lambda: model.head
    assert quantize.weight_bytes(model) == 100 * 16 * 4  # the tied table, once
    quantize.quantize_model(model, "int8")
    # the head's int8 copy (1 byte a weight) and its scales; the table is read a row at a time
    assert quantize.weight_bytes(model) == 100 * 16 + 100 * 4 + 16 * 4  # + one row of the table


# ---- the engine serves a quantized model exactly ----------------------------------------------
@pytest.fixture(scope="module", params=quantize.SCHEMES)
def quantized_runner(request, tiny_llama):
    return request.param, ModelRunner(str(tiny_llama), dtype="fp32", device="cpu", quantize=request.param)


def _engine(runner, model_path, strategy) -> Engine:
    config = ServingConfig(strategy=Strategy(strategy), batch_size=3, max_batch_delay_ms=0, max_rolling_batch_size=4,
                           max_rolling_batch_prefill_tokens=16, max_model_len=192, max_kv_cache_tokens=192 * 4,
                           block_size=4, enable_prefix_caching=strategy == "paged")
    return create_engine(config, str(model_path), runner=runner)


@pytest.mark.parametrize("strategy", ["dynamic", "rolling", "paged"])
def test_every_strategy_serves_the_quantized_model_exactly(quantized_runner, tiny_llama, strategy):
    """Greedy output of concurrent mixed requests equals ``generate`` of the same quantized model."""
    from transformers import AutoModelForCausalLM

    scheme, runner = quantized_runner
    assert runner.quantize_report.layers_quantized > 0
    engine = _engine(runner, tiny_llama, strategy)
    prompts = random_prompts(engine.tokenizer, 6, seed=5, min_words=5, max_words=30)
    max_new = [5, 24, 12, 20, 3, 16]
    outputs = run_staggered(engine, prompts, max_new, arrivals=[0, 0, 1, 4, 9, 12])
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    quantize.quantize_model(reference, scheme)
    with torch.inference_mode():
        for prompt, limit, output in zip(prompts, max_new, outputs):
            ids = torch.tensor([prompt])
            generated = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=limit, pad_token_id=0)[0, len(prompt):].tolist()
            eos = runner.eos_token_ids
            expected = next((generated[:i + 1] for i, t in enumerate(generated) if t in eos), generated)
            assert output == expected
    assert engine.stats()["max_batch_size"] > 1


# ---- each precision against the unquantized default model ---------------------------------------
# measured when written (bf16 activations, 64 teacher-forced positions): int8 0.94 / 0.05, int4 0.89 / 0.14
BOUNDS = {"int8": (0.88, 0.12), "int4": (0.8, 0.3)}


@pytest.mark.parametrize("scheme", quantize.SCHEMES)
def test_quantized_default_model_agrees_with_the_unquantized_one(scheme):
    """The share of teacher-forced positions where the quantized model (bf16 activations, as
    ``option.dtype=auto`` serves on these CPUs) picks fp32's top token, and the logit error."""
    from transformers import AutoModelForCausalLM

    from container.default_model import default_model_path

    lower = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.bfloat16).eval()
    report = quantize.quantize_model(lower, scheme)
    assert report.layers_kept == 0 and report.bytes_after < report.bytes_before / (1.9 if scheme == "int8" else 3)
    agreement, error = agreement_with_fp32(lower, scheme)
    min_agreement, max_error = BOUNDS[scheme]
    assert agreement >= min_agreement
    assert error <= max_error

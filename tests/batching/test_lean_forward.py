"""The engine's own forward for Llama-family models (batching.lean_forward): fused projections
that leave transformers' forward intact, the structural check that keeps everything else on
transformers' forward, and the load-time fallback when the lean forward disagrees with the model.
Its exactness against ``generate`` is the compatibility matrix's (test_model_matrix.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from batching import lean_forward
from batching.runner import ModelRunner
from tests.tiny_models import build_model


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("qwen2"), "qwen2")  # q/k/v with bias


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def test_fused_projections_keep_the_models_own_forward_and_store_each_weight_once(qwen2_folder):
    original, fused = _load(qwen2_folder), _load(qwen2_folder)
    assert lean_forward.fuse_projections(fused) == "Qwen2"
    tokens = torch.randint(0, original.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = original(tokens).logits, fused(tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in original.parameters())
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj, lean_forward.FusedSlice)
    assert lean_forward.QKV in dict(attn.named_children())


def test_fused_slices_called_with_different_inputs_each_compute_their_own(qwen2_folder):
    original, fused = _load(qwen2_folder), _load(qwen2_folder)
    lean_forward.fuse_projections(fused)
    a, b = torch.randn(3, original.config.hidden_size), torch.randn(3, original.config.hidden_size)
    before, after = original.model.layers[1].self_attn, fused.model.layers[1].self_attn
    with torch.inference_mode():
        torch.testing.assert_close(after.q_proj(a), before.q_proj(a))
        torch.testing.assert_close(after.k_proj(b), before.k_proj(b))  # not q's cached product of a
        torch.testing.assert_close(after.v_proj(a), before.v_proj(a))
        torch.testing.assert_close(after.q_proj(a), before.q_proj(a))  # a second round on the same input


def test_models_outside_the_lean_families_keep_transformers_forward(tmp_path, qwen2_folder):
    gelu = build_model(tmp_path / "gelu", "llama", hidden_act="gelu")
    assert lean_forward.lean_family(_load(gelu))[0] is None
    hooked = _load(qwen2_folder)
    hooked.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    family, reason = lean_forward.lean_family(hooked)
    assert family is None and "hooks" in reason
    extra = _load(qwen2_folder)
    extra.model.layers[1].self_attn.add_module("extra", torch.nn.Identity())
    assert lean_forward.lean_family(extra)[0] is None
    assert lean_forward.fuse_projections(extra) is None
    assert isinstance(extra.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # left untouched
    runner = ModelRunner(str(gelu), dtype="fp32", device="cpu")
    assert runner.lean is None


def test_a_lean_forward_that_disagrees_with_the_model_is_not_served(qwen2_folder, monkeypatch, caplog):
    # A deliberately wrong own forward (logits off by a quarter): the load-time check must catch it
    # and fall back to transformers' forward.
    right = lean_forward.LeanForward.__call__
    monkeypatch.setattr(lean_forward.LeanForward, "__call__", lambda self, *args: right(self, *args) * 1.25)
    with caplog.at_level(logging.WARNING, logger="batching.runner"):
        runner = ModelRunner(str(qwen2_folder), dtype="fp32", device="cpu")
    assert runner.lean is None
    assert "own forward disagrees" in caplog.text
    monkeypatch.undo()
    assert ModelRunner(str(qwen2_folder), dtype="fp32", device="cpu").lean is not None


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_models_use_the_lean_forward_on_fused_layers(tmp_path, scheme):
    # int4 needs 32-wide input groups: the default tiny shapes (64 / 128) take it.
    runner = ModelRunner(str(build_model(tmp_path / "llama", "llama")), dtype="fp32", device="cpu", quantize=scheme)
    assert runner.lean is not None
    names = {type(module).__name__ for module in runner.model.model.layers[0].self_attn.children()}
    assert "FusedSlice" in names and ("Int8WeightOnlyLinear" in names or "Int4WeightOnlyLinear" in names)


def test_partial_rotary_phi3_is_served_exactly_by_the_lean_forward(tmp_path):
    # Phi-3 with a partial rotary factor: only the first half of each head is rotated.
    from tests.batching.engine_helpers import make_engine
    from tests.batching.test_correctness import assert_matches_generate, random_prompts, run_staggered

    folder = build_model(tmp_path / "phi3", "phi3", partial_rotary_factor=0.5)
    engine = make_engine(folder, "paged", max_rolling_batch_size=4, max_rolling_batch_prefill_tokens=16,
                         max_model_len=128, max_kv_cache_tokens=512, block_size=4)
    assert engine.runner.lean is not None
    assert engine.runner.model.model.rotary_emb.inv_freq.numel() * 2 < engine.runner.layout.layers[0].head_dim
    prompts = random_prompts(engine.tokenizer, 4, seed=21, min_words=5, max_words=15)
    max_new = [12, 20, 7, 16]
    outputs = run_staggered(engine, prompts, max_new, arrivals=[0, 0, 2, 5])
    assert_matches_generate(folder, prompts, max_new, outputs)


def test_an_own_forward_that_fails_on_a_model_leaves_it_to_transformers(qwen2_folder, monkeypatch, caplog):
    # Whatever breaks in the own forward (here: an error in its first step) must not stop the load.
    def broken(self, *args):
        raise RuntimeError("a kernel refused its input")

    monkeypatch.setattr(lean_forward.LeanForward, "__call__", broken)
    with caplog.at_level(logging.WARNING, logger="batching.runner"):
        runner = ModelRunner(str(qwen2_folder), dtype="fp32", device="cpu")
    assert runner.lean is None and "a kernel refused its input" in caplog.text


def test_norms_outside_the_models_dtype_keep_transformers_forward(qwen2_folder):
    model = _load(qwen2_folder)
    family = lean_forward.fuse_projections(model)
    model.model.layers[1].post_attention_layernorm.weight.data = model.model.layers[1].post_attention_layernorm.weight.data.double()
    specs = [type("Spec", (), dict(layer_idx=i, num_kv_heads=2, head_dim=16, sliding_window=None, softcap=None,
                                   has_sinks=False))() for i in range(2)]
    with pytest.raises(ValueError, match="dtype"):
        lean_forward.LeanForward(model, family, specs)

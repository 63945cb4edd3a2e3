"""The offline API (``from batching import LLM``): serving.properties keys in, the same tokens as
``model.generate`` out, through whichever batcher the keys choose."""

from __future__ import annotations

import pytest

from batching import LLM
from djl_like.config import Strategy
from djl_like.errors import BadRequestError
from djl_like.protocol import GenerationParams
from tests.batching.engine_helpers import reference_tokens

PROMPTS = ["The capital of France is", "Continuous batching lets", "Größe 東京 🚀"]


@pytest.mark.parametrize("keys,strategy", [
    ({}, Strategy.PAGED),
    ({"rolling_batch": "auto", "paged_attention": False}, Strategy.ROLLING),
    ({"batch_size": 2, "max_batch_delay": 0}, Strategy.DYNAMIC),
])
def test_generate_matches_hf_generate_under_each_strategy(tiny_llama, keys, strategy):
    with LLM(str(tiny_llama), dtype="fp32", max_model_len=128, max_kv_cache_tokens=512, **keys) as llm:
        assert llm.config.strategy is strategy
        outputs = llm.generate(PROMPTS, {"max_new_tokens": 9, "ignore_eos": True}, use_tqdm=False)
        for prompt, output in zip(PROMPTS, outputs):
            prompt_ids = llm.tokenizer.encode(prompt)
            assert output.prompt == prompt and output.num_prompt_tokens == len(prompt_ids)
            assert output.token_ids == reference_tokens(tiny_llama, tuple(prompt_ids), 9, min_new_tokens=9)
            assert output.text == llm.tokenizer.decode(output.token_ids, skip_special_tokens=True)
            assert output.finish_reason == "length"
            assert len(output.log_probs) == 9 and all(lp <= 0 for lp in output.log_probs)


def test_per_prompt_parameters_token_prompts_and_validation(tiny_llama):
    with LLM(str(tiny_llama), properties={"option.dtype": "fp32", "option.max_model_len": "128"},
             max_kv_cache_tokens=512) as llm:
        ids = llm.tokenizer.encode(PROMPTS[0])
        short, long = llm.generate([ids, ids], [GenerationParams(max_new_tokens=2), {"max_new_tokens": 5}],
                                   use_tqdm=False)
        assert len(short.token_ids) <= 2 and len(long.token_ids) <= 5
        assert long.token_ids[:len(short.token_ids)] == short.token_ids  # greedy: one is a prefix
        with pytest.raises(BadRequestError, match="parameters.temperature"):
            llm.generate("hi", {"temperature": -1}, use_tqdm=False)
        with pytest.raises(ValueError, match="2 parameter sets for 1 prompts"):
            llm.generate(["hi"], [{}, {}], use_tqdm=False)
        # The engine still serves after refused input.
        assert llm.generate("hi", {"max_new_tokens": 1}, use_tqdm=False)[0].token_ids

"""The model runner's step: logits only where a token is sampled, none when nothing samples."""

from __future__ import annotations

from djl_like.protocol import GenerationParams
from tests.batching.engine_helpers import make_engine


def test_a_step_where_nothing_samples_computes_no_logits(tiny_llama):
    engine = make_engine(tiny_llama, "paged", max_rolling_batch_prefill_tokens=16, max_model_len=128,
                         max_kv_cache_tokens=512, block_size=4)
    rows_through_lm_head = []
    hook = engine.runner.model.lm_head.register_forward_hook(
        lambda module, args, output: rows_through_lm_head.append(args[0].shape[-2]))
    try:
        engine.submit(list(range(3, 43)), GenerationParams(max_new_tokens=2))  # 40 tokens: 3 chunks
        engine._drain_inbox()
        batch = engine.batcher.schedule()
        assert [item.num_new_tokens for item in batch.scheduled] == [16] and not batch.sampling_sequences
        logits = engine.runner.execute(batch)
        assert logits.shape[0] == 0 and rows_through_lm_head == [0]
        engine.batcher.advance(batch, [])
        engine.run_until_idle()  # the last chunk samples: one row each step from there on
        assert rows_through_lm_head[1:] == [0, 1, 1]
    finally:
        hook.remove()

"""The embedding model and engine in-process: vectors match a direct transformers computation,
whatever the batch, the packing or the concurrency; pooling settings and limits behave."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from batching.embedding_engine import EmbeddingEngine
from batching.embedding_model import EmbeddingModel
from djl_like.errors import BadRequestError, ConfigError, LmiError, ServiceUnavailableError
from tests.batching.embedding_helpers import TEXTS, copy_minilm, cosines, minilm_path, reference_vectors
from tests.tiny_models import build_tokenizer


@pytest.fixture(scope="module")
def minilm() -> EmbeddingModel:
    return EmbeddingModel(str(minilm_path()), dtype="fp32", device="cpu")


def engine_of(model: EmbeddingModel, **settings) -> EmbeddingEngine:
    defaults = dict(batch_size=8, max_batch_delay_s=0.05)
    return EmbeddingEngine(model, **{**defaults, **settings}).start()


def test_minilm_is_served_as_sentence_transformers_computes_it(minilm):
    assert (minilm.pooling, minilm.normalize, minilm.dimension, minilm.max_model_len) == ("mean", True, 384, 256)
    assert minilm.packed  # BERT: texts share one row, no padding
    ids = [minilm.tokenizer(text)["input_ids"] for text in TEXTS]
    vectors = minilm.embed(ids)
    assert min(cosines(vectors, reference_vectors(minilm_path(), TEXTS))) > 0.9999
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_a_text_gets_the_same_vector_alone_and_in_a_batch_of_identical_ones(minilm):
    ids = minilm.tokenizer(TEXTS[1])["input_ids"]
    alone = minilm.embed([ids])
    many = minilm.embed([ids] * 16)
    assert min(cosines(many, alone.expand(16, -1))) > 0.9999


def test_packed_and_padded_batches_agree(minilm):
    ids = [minilm.tokenizer(text)["input_ids"] for text in TEXTS]
    packed = torch.stack([s.mean(0) for s in minilm._packed_states(ids)])
    padded = torch.stack([s.mean(0) for s in minilm._padded_states(ids)])
    assert min(cosines(packed, padded)) > 0.99999


def test_engine_under_concurrency_matches_the_reference_and_batches(minilm):
    engine = engine_of(minilm, batch_size=16, max_batch_delay_s=0.2)
    expected = reference_vectors(minilm_path(), TEXTS)
    try:
        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(lambda i: engine.submit([TEXTS[i % len(TEXTS)]]).result(30), range(20)))
        for index, vectors in enumerate(results):
            assert cosines(vectors, expected[index % len(TEXTS)].unsqueeze(0))[0] > 0.9999
        assert engine.stats()["max_batch_size"] > 1
        assert engine.stats()["texts_pending"] == 0
    finally:
        engine.shutdown()


def test_texts_over_the_limit_are_refused_or_truncated(minilm):
    long_text = "word " * 400
    strict = engine_of(minilm)
    cutting = engine_of(minilm, truncate=True)
    try:
        with pytest.raises(BadRequestError, match=r"inputs\[1\] is 402 tokens long, over the model's limit of 256"):
            strict.submit(["fine", long_text])
        vector = cutting.submit([long_text]).result(30)[0]
        first_256 = minilm.tokenizer(long_text, truncation=True, max_length=256)["input_ids"]
        assert len(first_256) == 256
        assert cosines([vector], minilm.embed([first_256]))[0] > 0.9999
    finally:
        strict.shutdown()
        cutting.shutdown()


def test_a_full_queue_is_refused_with_503(minilm):
    engine = EmbeddingEngine(minilm, batch_size=4, max_batch_delay_s=0.0, job_queue_size=3)  # not started
    engine.submit(["a", "b"])
    with pytest.raises(ServiceUnavailableError, match="queue is full"):
        engine.submit(["c", "d"])
    with pytest.raises(BadRequestError, match="at most job_queue_size"):
        engine.submit(["x"] * 4)


def test_a_failing_text_fails_only_its_request(minilm):
    engine = EmbeddingEngine(minilm, batch_size=8, max_batch_delay_s=0.3)
    poison = minilm.tokenizer("poison")["input_ids"][1]
    real_embed = minilm.embed

    def embed(texts):
        if any(poison in ids for ids in texts):
            raise RuntimeError("the model chokes on poison")
        return real_embed(texts)

    engine.model = type("Model", (), {"embed": staticmethod(embed)})()
    engine.start()
    try:
        handles = [engine.submit([text]) for text in ("good one", "poison", "good two")]
        assert len(handles[0].result(30)[0]) == 384
        with pytest.raises(LmiError) as error:
            handles[1].result(30)
        assert error.value.status == 424 and "poison" in error.value.message
        assert len(handles[2].result(30)[0]) == 384
    finally:
        engine.shutdown()


def test_sentence_transformers_pooling_config_is_honoured(tmp_path):
    folder = copy_minilm(tmp_path / "cls")
    config_file = folder / "1_Pooling" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    config_file.write_text(json.dumps(config))
    model = EmbeddingModel(str(folder), dtype="fp32", device="cpu")
    assert model.pooling == "cls"
    ids = [model.tokenizer(text)["input_ids"] for text in TEXTS]
    assert min(cosines(model.embed(ids), reference_vectors(folder, TEXTS, "cls"))) > 0.9999
    explicit = EmbeddingModel(str(folder), dtype="fp32", device="cpu", pooling="mean", normalize=False)
    expected = reference_vectors(folder, TEXTS, "mean", normalize=False)
    vectors = explicit.embed(ids)
    assert torch.allclose(vectors, expected, atol=1e-4)  # option.pooling wins; no normalisation
    assert not torch.allclose(vectors.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-2)


@pytest.mark.parametrize("change, message", [
    ({"pooling_mode_weightedmean_tokens": True, "pooling_mode_mean_tokens": False}, "weighted mean"),
    ({"pooling_mode_cls_token": True}, r"concatenates several poolings \(mean, cls\)"),
])
def test_sentence_transformers_pooling_this_server_cannot_reproduce_is_refused(tmp_path, change, message):
    folder = copy_minilm(tmp_path / "model")
    config_file = folder / "1_Pooling" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    with pytest.raises(ConfigError, match=message):
        EmbeddingModel(str(folder), dtype="fp32", device="cpu")


def test_a_dense_module_is_refused_not_skipped(tmp_path):
    folder = copy_minilm(tmp_path / "model")
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match="does not apply: Dense"):
        EmbeddingModel(str(folder), dtype="fp32", device="cpu")


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_decoder_models_embed_with_last_token_pooling(request, architecture):
    folder = request.getfixturevalue(f"tiny_{architecture}")
    model = EmbeddingModel(str(folder), dtype="fp32", device="cpu")
    assert model.is_decoder and model.pooling == "last" and model.packed
    ids = [model.tokenizer(text)["input_ids"] for text in TEXTS]
    expected = reference_vectors(folder, TEXTS, "last")
    assert min(cosines(model.embed(ids), expected)) > 0.9999


def tiny_roberta(folder: Path) -> Path:
    """An encoder whose positions start after the padding index: packing cannot reproduce them."""
    import transformers as hf

    tokenizer = build_tokenizer(folder)
    config = hf.RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    hf.RobertaModel(config).save_pretrained(folder)
    return folder


def test_a_model_packing_cannot_reproduce_is_served_padded(tmp_path):
    folder = tiny_roberta(tmp_path / "roberta")
    model = EmbeddingModel(str(folder), dtype="fp32", device="cpu")
    assert not model.packed  # the load probe saw different vectors
    ids = [model.tokenizer(text)["input_ids"] for text in TEXTS]
    assert min(cosines(model.embed(ids), reference_vectors(folder, TEXTS))) > 0.9999


def test_max_model_len_beyond_the_positions_is_refused():
    with pytest.raises(ConfigError, match="option.max_model_len=1024 exceeds"):
        EmbeddingModel(str(minilm_path()), dtype="fp32", device="cpu", max_model_len=1024)


def test_concurrent_submissions_never_lose_a_text(minilm):
    engine = engine_of(minilm, batch_size=4, max_batch_delay_s=0.01)
    barrier = threading.Barrier(6)

    def submit(index):
        barrier.wait()
        return engine.submit([f"text number {index}", "shared"]).result(30)

    try:
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(submit, range(6)))
        assert all(len(vectors) == 2 for vectors in results)
        shared = [vectors[1] for vectors in results]
        assert min(cosines(shared, [shared[0]] * 6)) > 0.9999
    finally:
        engine.shutdown()

"""Text embedding served by a real ``serve``, started from serving.properties alone: LMI's
``/invocations`` and OpenAI's ``/v1/embeddings`` answer the vectors sentence-transformers would
compute, concurrent requests are batched together, and errors follow the contract."""

from __future__ import annotations

import base64
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.batching.embedding_helpers import TEXTS, copy_minilm, cosines, minilm_path, reference_vectors
from tests.container.test_serve_http import QUIET_ENV, model_folder
from tests.server import start_server


@pytest.fixture(scope="module")
def expected():
    return reference_vectors(minilm_path(), TEXTS)


@pytest.fixture(scope="module")
def embedding_server(tmp_path_factory):
    # No option.task: a sentence-transformers folder is an embedding model.
    folder = copy_minilm(tmp_path_factory.mktemp("minilm") / "model", {"batch_size": "16", "max_batch_delay": "200"})
    with start_server(folder, {**QUIET_ENV, "SAGEMAKER_MAX_PAYLOAD_IN_MB": "1"}) as server:
        yield server


def post(server, path: str, body, **kwargs) -> requests.Response:
    return requests.post(server.url + path, json=body, timeout=60, **kwargs)


def test_ping_reports_the_embedding_mode(embedding_server):
    assert requests.get(embedding_server.url + "/ping", timeout=10).json() == {"status": "healthy",
                                                                              "mode": "text-embedding"}


def test_one_text_answers_one_vector_a_list_answers_a_list(embedding_server, expected):
    single = post(embedding_server, "/invocations", {"inputs": TEXTS[0]})
    assert single.status_code == 200 and single.headers["Content-Type"] == "application/json"
    vector = single.json()
    assert isinstance(vector, list) and len(vector) == 384 and isinstance(vector[0], float)
    assert cosines([vector], expected[:1])[0] > 0.9999
    many = post(embedding_server, "/invocations", {"inputs": TEXTS}).json()
    assert len(many) == len(TEXTS)
    assert min(cosines(many, expected)) > 0.9999


def test_openai_embeddings_float_and_base64(embedding_server, expected):
    floats = post(embedding_server, "/v1/embeddings", {"input": TEXTS[:2], "model": "minilm"}).json()
    assert floats["object"] == "list" and floats["model"] == "model"
    assert [item["index"] for item in floats["data"]] == [0, 1]
    assert all(item["object"] == "embedding" for item in floats["data"])
    assert min(cosines([item["embedding"] for item in floats["data"]], expected[:2])) > 0.9999
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    num_tokens = sum(len(tokenizer(text)["input_ids"]) for text in TEXTS[:2])
    assert floats["usage"] == {"prompt_tokens": num_tokens, "total_tokens": num_tokens}
    encoded = post(embedding_server, "/v1/embeddings", {"input": TEXTS[0], "encoding_format": "base64"}).json()
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(decoded) == 384
    assert max(abs(a - b) for a, b in zip(decoded, floats["data"][0]["embedding"])) < 1e-6


def test_concurrent_requests_are_batched_and_agree_with_one_alone(embedding_server, expected):
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: post(embedding_server, "/invocations", {"inputs": TEXTS[i % 5]}),
                                  range(32)))
    assert [response.status_code for response in responses] == [200] * 32
    for index, response in enumerate(responses):
        assert cosines([response.json()], expected[index % 5].unsqueeze(0))[0] > 0.9999
    stats = requests.get(embedding_server.url + "/stats", timeout=10).json()
    assert stats["max_batch_size"] > 1 and stats["packed"] is True


@pytest.mark.parametrize("path, body, status, message", [
    ("/invocations", {"inputs": "word " * 300}, 400, "over the model's limit of 256 tokens"),
    ("/invocations", {"inputs": ["ok", ""]}, 400, "inputs[1] is empty"),
    ("/invocations", {"input": "x"}, 400, "inputs is missing"),
    ("/invocations", {"inputs": 3}, 400, "inputs must be"),
    ("/v1/embeddings", {"input": [1, 2, 3]}, 400, "token arrays are not accepted"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "dimensions": 128}, 400, "384 dimensions"),
])
def test_bad_requests_are_400_naming_the_field(embedding_server, path, body, status, message):
    response = post(embedding_server, path, body)
    assert response.status_code == status
    if path.startswith("/v1/"):  # OpenAI's error object, what OpenAI clients parse
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and message in error["message"]
    else:
        assert response.json()["type"] == "BadRequest"
        assert message in response.json()["message"]


def test_body_over_the_payload_limit_is_413(embedding_server):
    response = requests.post(embedding_server.url + "/invocations", data=b'{"inputs": "' + b"a" * (2 << 20) + b'"}',
                             timeout=60)
    assert response.status_code == 413


def test_unknown_parameters_are_reported_not_fatal(embedding_server):
    response = post(embedding_server, "/invocations", {"inputs": "x", "parameters": {"pool": "max"}})
    assert response.status_code == 200
    assert response.headers["X-LMI-Ignored-Parameters"] == "pool"


def test_truncate_and_cls_pooling_from_serving_properties(tmp_path):
    folder = copy_minilm(tmp_path / "model", {"option.truncate": "true", "pooling": "cls", "normalize": "false"})
    with start_server(folder, QUIET_ENV) as server:
        long_text = post(server, "/invocations", {"inputs": "word " * 300})
        vector = post(server, "/invocations", {"inputs": TEXTS[0]}).json()
    assert long_text.status_code == 200 and len(long_text.json()) == 384
    expected = reference_vectors(minilm_path(), TEXTS[:1], "cls", normalize=False)
    assert cosines([vector], expected)[0] > 0.9999
    assert abs(sum(v * v for v in vector) ** 0.5 - float(expected[0].norm())) < 1e-3


def test_a_decoder_serves_embeddings_when_the_task_says_so(tiny_llama, tmp_path, ):
    folder = model_folder(tmp_path, tiny_llama, {"option.task": "text-embedding"})
    with start_server(folder, QUIET_ENV) as server:
        health = requests.get(server.url + "/ping", timeout=10).json()
        vector = post(server, "/invocations", {"inputs": TEXTS[0]}).json()
    assert health["mode"] == "text-embedding"
    expected = reference_vectors(tiny_llama, TEXTS[:1], "last")
    assert cosines([vector], expected)[0] > 0.9999


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b"[1]", "must be a JSON object"),
    (b'{"inputs": NaN}', "not valid JSON"),
    (b'{"inputs": "a\\ud800b"}', "inputs is not valid Unicode"),
])
def test_malformed_bodies_are_400(embedding_server, body, message):
    response = requests.post(embedding_server.url + "/invocations", data=body, timeout=30)
    assert response.status_code == 400
    assert message in response.json()["message"]

"""``serve`` end to end: real servers started as users start them, real HTTP.

Three servers, one per batching strategy, each on its own tiny model folder with its own
serving.properties:

- paged (tiny Llama, json by default, 1 MB payload limit): the request protocol and bad inputs;
- dynamic (tiny Qwen2, batch_size=4, sse by default): batching of concurrent requests, SSE;
- rolling (tiny Llama with an 8192-token context): long generations that clients abandon.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests

from tests.server import REPO_ROOT, Server, free_port, start_server, wait_healthy

# Two servers must not fight over two cores.
QUIET_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
LONG_CONTEXT = 8192
IGNORED_HEADER = "X-LMI-Ignored-Parameters"


def model_folder(tmp_path: Path, model: Path, properties: dict[str, str],
                 config_changes: dict | None = None) -> Path:
    """A copy of ``model`` with ``serving.properties`` (and config.json changes) of its own."""
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    lines = [f"{key}={value}" for key, value in properties.items()]
    (folder / "serving.properties").write_text("\n".join(lines) + "\n")
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


@pytest.fixture(scope="module")
def paged_server(tiny_llama, tmp_path_factory):
    folder = model_folder(tmp_path_factory.mktemp("paged"), tiny_llama,
                          {"option.rolling_batch": "auto", "option.paged_attention": "true"})
    with start_server(folder, {**QUIET_ENV, "SAGEMAKER_MAX_PAYLOAD_IN_MB": "1"}) as server:
        yield server


@pytest.fixture(scope="module")
def dynamic_server(tiny_qwen2, tmp_path_factory):
    folder = model_folder(tmp_path_factory.mktemp("dynamic"), tiny_qwen2, {
        "batch_size": "4", "max_batch_delay": "1000", "option.rolling_batch": "disable",
        "option.output_formatter": "sse", "option.apply_chat_template": "true"})
    with start_server(folder, QUIET_ENV) as server:
        yield server


@pytest.fixture(scope="module")
def rolling_server(tiny_llama, tmp_path_factory):
    # NOTE: Llama's rotary positions extend to any length: a longer context makes generations
    # long enough (seconds) to be abandoned mid-way.
    folder = model_folder(tmp_path_factory.mktemp("rolling"), tiny_llama, {
        "option.rolling_batch": "auto", "option.paged_attention": "false"},
        {"max_position_embeddings": LONG_CONTEXT})
    with start_server(folder, QUIET_ENV) as server:
        yield server


# --- helpers -------------------------------------------------------------------------------------


def invoke(server, body, **kwargs) -> requests.Response:
    return requests.post(server.url + "/invocations", json=body, timeout=60, **kwargs)


def stats(server) -> dict:
    response = requests.get(server.url + "/stats", timeout=10)
    assert response.status_code == 200
    return response.json()


def assert_still_serving(server) -> None:
    response = invoke(server, {"inputs": "Paris is", "parameters": {"max_new_tokens": 3,
                                                                    "ignore_eos": True}})
    assert response.status_code == 200, response.text
    assert response.json()["generated_text"]


def wait_until(condition, timeout: float = 5.0, interval: float = 0.1):
    """Poll ``condition()`` until it returns a truthy value; return it (or the last value)."""
    deadline = time.monotonic() + timeout
    value = condition()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = condition()
    return value


def stream_events(response: requests.Response, output_formatter: str) -> list[dict]:
    """The JSON objects of a jsonlines or SSE stream (SSE's [DONE] marker excluded)."""
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if not line:
            continue
        if output_formatter == "sse":
            assert line.startswith("data: "), line
            line = line.removeprefix("data: ")
            if line == "[DONE]":
                continue
        events.append(json.loads(line))
    return events


def greedy(prompt: str | list[str], max_new_tokens: int, **extra) -> dict:
    return {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "do_sample": False,
                                             "ignore_eos": True, **extra}}


# --- the protocol (paged) ------------------------------------------------------------------------


def test_ping_is_healthy_after_loading(paged_server):
    response = requests.get(paged_server.url + "/ping", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "healthy", "strategy": "paged"}


def test_single_prompt_answers_generated_text(paged_server):
    response = invoke(paged_server, {"inputs": "The capital of France is",
                                     "parameters": {"max_new_tokens": 5}})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"generated_text"}
    assert isinstance(body["generated_text"], str)


def test_list_inputs_answer_a_list_in_order(paged_server):
    prompts = ["Once upon a time", "def forward(self):", "The capital of Japan"]
    request = greedy(prompts, 4, details=True)
    response = invoke(paged_server, request)
    assert response.status_code == 200
    outputs = response.json()
    assert [output["details"]["inputs"] for output in outputs] == prompts
    alone = invoke(paged_server, greedy(prompts[1], 4)).json()["generated_text"]
    assert outputs[1]["generated_text"] == alone  # matched by id, not by position


def test_details_report_every_token(paged_server):
    response = invoke(paged_server, greedy("Continuous batching", 6, details=True))
    body = response.json()
    details = body["details"]
    assert details["finish_reason"] == "length"
    assert details["generated_tokens"] == 6 == len(details["tokens"])
    assert details["inputs"] == "Continuous batching"
    assert details["prompt_tokens"] > 0
    assert "".join(token["text"] for token in details["tokens"]) == body["generated_text"]
    assert all(isinstance(token["id"], int) and token["log_prob"] <= 0
               for token in details["tokens"])


def test_ignore_eos_generates_exactly_max_new_tokens(paged_server):
    for max_new_tokens in (1, 17, 40):
        details = invoke(paged_server, greedy("Un café", max_new_tokens, details=True)).json()
        assert details["details"]["generated_tokens"] == max_new_tokens


def test_return_full_text_prepends_the_prompt(paged_server):
    plain = invoke(paged_server, greedy("PagedAttention stores", 5)).json()["generated_text"]
    full = invoke(paged_server, greedy("PagedAttention stores", 5, return_full_text=True)).json()
    assert full["generated_text"] == "PagedAttention stores" + plain


TOO_LONG_PROMPT = " ".join(["pages"] * 2000)
BAD_BODIES = [
    pytest.param(b"{not json", "not valid JSON", id="not-json"),
    pytest.param(b"[1, 2]", "JSON object", id="not-an-object"),
    pytest.param({"parameters": {"max_new_tokens": 3}}, "inputs is missing", id="no-inputs"),
    pytest.param({"inputs": 42}, "inputs", id="inputs-number"),
    pytest.param({"inputs": ""}, "inputs", id="inputs-empty-string"),
    pytest.param({"inputs": []}, "inputs", id="inputs-empty-list"),
    pytest.param({"inputs": ["ok", 3]}, "inputs[1]", id="inputs-list-item"),
    pytest.param({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, "max_new_tokens",
                 id="max-new-tokens-zero"),
    pytest.param({"inputs": "hi", "parameters": {"max_new_tokens": -5}}, "max_new_tokens",
                 id="max-new-tokens-negative"),
    pytest.param({"inputs": "hi", "parameters": {"max_new_tokens": 2.5}}, "max_new_tokens",
                 id="max-new-tokens-float"),
    pytest.param({"inputs": "hi", "parameters": {"max_new_tokens": "10"}}, "max_new_tokens",
                 id="max-new-tokens-string"),
    pytest.param({"inputs": "hi", "parameters": {"max_new_tokens": 100_000}}, "max_new_tokens",
                 id="max-new-tokens-beyond-model"),
    pytest.param({"inputs": "hi", "parameters": {"temperature": -0.5}}, "temperature",
                 id="temperature-negative"),
    pytest.param({"inputs": "hi", "parameters": {"top_p": 0}}, "top_p", id="top-p-zero"),
    pytest.param({"inputs": "hi", "parameters": {"top_p": 1.5}}, "top_p", id="top-p-above-one"),
    pytest.param({"inputs": "hi", "parameters": {"top_k": -1}}, "top_k", id="top-k-negative"),
    pytest.param({"inputs": "hi", "parameters": "fast"}, "parameters", id="parameters-string"),
    pytest.param({"inputs": TOO_LONG_PROMPT}, "model length limit", id="prompt-too-long"),
    pytest.param({"inputs": ["fine", TOO_LONG_PROMPT]}, "inputs[1]", id="list-prompt-too-long"),
    pytest.param({"messages": [{"role": "wizard", "content": "hi"}]}, "role", id="chat-role"),
]


@pytest.mark.parametrize(("body", "named"), BAD_BODIES)
def test_bad_input_is_a_400_naming_the_problem(paged_server, body, named):
    if isinstance(body, bytes):
        response = requests.post(paged_server.url + "/invocations", data=body, timeout=30,
                                 headers={"Content-Type": "application/json"})
    else:
        response = invoke(paged_server, body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["code"] == 400 and error["type"] == "BadRequest"
    assert named in error["message"]
    assert_still_serving(paged_server)


def test_unknown_parameter_is_ignored_and_reported(paged_server):
    response = invoke(paged_server, {"inputs": "hi", "parameters": {
        "max_new_tokens": 2, "best_of": 3, "watermark": True}})
    assert response.status_code == 200
    assert response.headers[IGNORED_HEADER] == "best_of, watermark"
    assert "generated_text" in response.json()


def test_body_over_the_payload_limit_is_a_413(paged_server):
    body = json.dumps({"inputs": "x" * (2 * 1024 * 1024)}).encode()
    response = requests.post(paged_server.url + "/invocations", data=body, timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["type"] == "PayloadTooLarge"
    assert "1048576" in response.json()["message"]
    assert_still_serving(paged_server)


def test_body_just_under_the_payload_limit_is_read_whole(paged_server):
    words = " ".join(["pages"] * 150_000)  # 900 KB: valid JSON, a prompt far too long
    response = invoke(paged_server, {"inputs": words})
    assert response.status_code == 400
    assert "model length limit" in response.json()["message"]


def test_chunked_body_over_the_payload_limit_is_a_413(paged_server):
    chunks = (b"x" * 65536 for _ in range(32))  # 2 MB without a Content-Length
    response = requests.post(paged_server.url + "/invocations", data=chunks, timeout=30)
    assert response.status_code == 413
    assert_still_serving(paged_server)


def test_jsonlines_stream_matches_the_whole_answer(paged_server):
    check_stream_matches_whole_answer(paged_server, "jsonlines", {"stream": True})


def test_chat_body_is_answered_in_the_openai_shape(paged_server):
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 7, "ignore_eos": True}
    for route in ("/invocations", "/v1/chat/completions"):
        response = requests.post(paged_server.url + route, json=body, timeout=30)
        assert response.status_code == 200, response.text
        completion = response.json()
        assert completion["object"] == "chat.completion"
        assert completion["id"].startswith("chatcmpl-")
        choice = completion["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] == "length"
        usage = completion["usage"]
        assert usage["completion_tokens"] == 7
        assert usage["total_tokens"] == usage["prompt_tokens"] + 7


def test_apply_chat_template_answers_plain_inputs_as_a_user_message(dynamic_server):
    question = "What is the capital of France?"
    plain = invoke(dynamic_server, {**greedy(question, 9), "stream": False})
    chat = invoke(dynamic_server, {"messages": [{"role": "user", "content": question}], "max_tokens": 9, "ignore_eos": True,
                                   "stream": False})
    assert plain.status_code == 200 and chat.status_code == 200, (plain.text, chat.text)
    assert plain.json()["generated_text"] == chat.json()["choices"][0]["message"]["content"]


def test_templated_prompt_reports_the_same_inputs_and_full_text_streamed_or_not(dynamic_server):
    question = "What is the capital of France?"
    request = greedy(question, 6, details=True, return_full_text=True)
    whole = invoke(dynamic_server, {**request, "stream": False}).json()
    events = stream_events(invoke(dynamic_server, request, stream=True), "sse")
    generated = "".join(event["token"]["text"] for event in events)
    assert whole["generated_text"] == question + generated
    assert events[-1]["generated_text"] == whole["generated_text"]
    assert events[-1]["details"]["inputs"] == whole["details"]["inputs"] == question
    assert events[-1]["details"]["prompt_tokens"] == whole["details"]["prompt_tokens"]


def test_chat_route_refuses_a_generation_body(paged_server):
    response = requests.post(paged_server.url + "/v1/chat/completions", json={"inputs": "hi"},
                             timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]  # OpenAI's error shape on /v1
    assert error["param"] == "messages" and "messages is missing" in error["message"]


def test_unknown_route_is_a_json_404(paged_server):
    response = requests.get(paged_server.url + "/nowhere", timeout=10)
    assert response.status_code == 404
    assert response.json()["code"] == 404


SURROGATE_BODIES = [
    pytest.param("/invocations", rb'{"inputs": "abc \ud800 def"}', "inputs is not valid Unicode",
                 id="inputs"),
    pytest.param("/invocations", rb'{"inputs": ["fine", "x \udfff"]}', "inputs[1] is not valid Unicode",
                 id="list-element"),
    pytest.param("/invocations", rb'{"messages": [{"role": "user", "content": "hi \ud800"}]}',
                 "messages[0].content is not valid Unicode", id="chat-content"),
    pytest.param("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "hi \ud800"}]}',
                 "messages[0].content is not valid Unicode", id="chat-route"),
    pytest.param("/v1/chat/completions",
                 rb'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\udbff"]}',
                 "stop[0] is not valid Unicode", id="chat-route-stop"),
]


@pytest.mark.parametrize(("route", "raw", "named"), SURROGATE_BODIES)
def test_lone_surrogate_is_a_400_naming_the_field_on_every_route(paged_server, route, raw, named):
    response = requests.post(paged_server.url + route, data=raw, timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    body = response.json()
    error = body["error"] if route.startswith("/v1/") else body  # OpenAI's error shape on /v1
    assert error["type"] == ("invalid_request_error" if route.startswith("/v1/") else "BadRequest")
    assert named in error["message"] and "lone surrogate" in error["message"]
    assert_still_serving(paged_server)


def raw_exchange(server, data: bytes, *, end_input: bool = False, timeout: float = 10) -> bytes:
    """Send raw bytes on a new connection and read until the server closes it (``end_input``
    closes the sending side first, for bodies that stop short)."""
    address = urlparse(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=timeout) as client:
        client.sendall(data)
        if end_input:
            client.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
    return received


def json_error(reply: bytes) -> tuple[int, dict]:
    """(status, JSON body) of the first response in ``reply``."""
    head, _, rest = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
    assert headers[b"Content-Type"].strip().startswith(b"application/json"), reply
    length = int(headers[b"Content-Length"])
    return status, json.loads(rest[:length])


CHUNKED_POST = (b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")


@pytest.mark.parametrize(("body", "end_input", "named"), [
    pytest.param(b"zz\r\n{}\r\n0\r\n\r\n", False, "InvalidChunkSize", id="chunk-size-zz"),
    pytest.param(b"2\r\n{}XX0\r\n\r\n", False, "ChunkMissingTerminator", id="no-terminator"),
    pytest.param(b"10\r\n{\"inputs\"", True, "NoMoreData", id="ends-mid-chunk"),
])
def test_malformed_chunked_body_is_a_json_400_and_closes_the_connection(paged_server, body,
                                                                          end_input, named):
    # A request hidden after the broken framing must not be served from the same connection.
    smuggled = b"GET /stats HTTP/1.1\r\nHost: test\r\n\r\n"
    reply = raw_exchange(paged_server, CHUNKED_POST + body + (b"" if end_input else smuggled),
                         end_input=end_input)
    status, error = json_error(reply)
    assert status == 400 and error["type"] == "BadRequest", error
    assert "request body could not be read" in error["message"] and named in error["message"]
    assert reply.count(b"HTTP/1.1 ") == 1, reply
    assert_still_serving(paged_server)


@pytest.mark.parametrize(("request_bytes", "status"), [
    pytest.param(b"GARBAGE\r\n\r\n", 400, id="request-line"),
    pytest.param(b"POST /invocations HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n{}", 400,
                 id="content-length"),
    pytest.param(b"GET /ping HTTP/1.1\r\nHost: t\r\n" + b"X-Many: 1\r\n" * 200 + b"\r\n", 431,
                 id="too-many-headers"),
])
def test_protocol_errors_gunicorn_answers_itself_are_json(paged_server, request_bytes, status):
    reply = raw_exchange(paged_server, request_bytes)
    got, error = json_error(reply)
    assert got == status == error["code"], reply
    assert error["message"]
    assert b"<html>" not in reply
    assert_still_serving(paged_server)


def test_unknown_parameter_names_that_headers_cannot_carry_are_escaped(paged_server):
    response = invoke(paged_server, {"inputs": "hi", "parameters": {
        "max_new_tokens": 1, "bad\r\nX-Injected: 1": True, "東京": 2}})
    assert response.status_code == 200, response.text
    assert "X-Injected" not in response.headers
    assert response.headers[IGNORED_HEADER] == "bad\\x0d\\x0aX-Injected: 1, \\u6771\\u4eac"


def test_stop_sequences_over_the_limits_are_a_400(paged_server):
    many = invoke(paged_server, {"inputs": "hi", "parameters": {"stop": ["s"] * 50_000}})
    long = invoke(paged_server, {"inputs": "hi", "parameters": {"stop_sequences": ["x" * 300_000]}})
    assert (many.status_code, long.status_code) == (400, 400)
    assert "50000 stop sequences, over the limit of 16" in many.json()["message"]
    assert "at most 256" in long.json()["message"]


# --- streaming under each strategy ---------------------------------------------------------------


def check_stream_matches_whole_answer(server, output_formatter: str, stream_flag: dict) -> None:
    """Streamed token texts concatenate to the non-streamed greedy answer of the same request."""
    request = greedy("Once upon a time, a small model", 12, details=True)
    whole = invoke(server, {**request, "stream": False}).json()
    response = invoke(server, {**request, **stream_flag}, stream=True)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith(
        {"jsonlines": "application/jsonlines", "sse": "text/event-stream"}[output_formatter])
    events = stream_events(response, output_formatter)
    assert len(events) == 12
    assert "".join(event["token"]["text"] for event in events) == whole["generated_text"]
    assert [event["token"]["id"] for event in events] == [
        token["id"] for token in whole["details"]["tokens"]]
    assert all("generated_text" not in event for event in events[:-1])
    assert events[-1]["generated_text"] == whole["generated_text"]
    assert events[-1]["details"]["finish_reason"] == "length"


def test_sse_stream_under_dynamic_batching(dynamic_server):
    check_stream_matches_whole_answer(dynamic_server, "sse", {})  # sse is the server's default


def test_jsonlines_stream_under_rolling_batching(rolling_server):
    check_stream_matches_whole_answer(rolling_server, "jsonlines", {"stream": True})


def test_chat_stream_sends_chunks_then_done(dynamic_server):
    response = invoke(dynamic_server, {"messages": [{"role": "user", "content": "Hello"}],
                                       "max_tokens": 5, "ignore_eos": True}, stream=True)
    assert response.status_code == 200
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert len(chunks) == 5
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None] * 4 + ["length"]


# --- dynamic batching of concurrent requests -----------------------------------------------------


def test_concurrent_requests_are_batched_together(dynamic_server):
    def one(index: int) -> requests.Response:
        return invoke(dynamic_server, {**greedy(f"Request number {index}", 8), "stream": False})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    assert [response.status_code for response in responses] == [200] * 8
    assert stats(dynamic_server)["max_batch_size"] > 1


# --- clients that go away, and timeouts (rolling) ------------------------------------------------


def _abort_count(server) -> int:
    return stats(server)["requests_finished"].get("abort", 0)


def _kv_released(server, aborts_before: int) -> dict | None:
    current = stats(server)
    released = (current["running"] == 0 and current["kv_tokens_reserved"] == 0
                and current["requests_finished"].get("abort", 0) > aborts_before)
    return current if released else None


def _disconnects(server) -> int:
    return stats(server)["requests_aborted"].get("client_disconnected", 0)


def test_client_leaving_a_stream_frees_its_sequence(rolling_server):
    aborts_before, disconnects_before = _abort_count(rolling_server), _disconnects(rolling_server)
    long_request = {**greedy("Once upon a time", LONG_CONTEXT - 100), "stream": True}
    with ThreadPoolExecutor(1) as pool:
        response = invoke(rolling_server, long_request, stream=True)
        lines = response.iter_lines()
        first_lines = [next(lines), next(lines)]
        other = pool.submit(invoke, rolling_server, greedy("Meanwhile", 20, details=True))
        response.close()  # the client goes away mid-stream
        assert all(json.loads(line)["token"] for line in first_lines)
        finished = other.result(timeout=30)
    assert finished.status_code == 200
    assert finished.json()["details"]["generated_tokens"] == 20
    assert wait_until(lambda: _kv_released(rolling_server, aborts_before)), stats(rolling_server)
    assert _disconnects(rolling_server) == disconnects_before + 1


def test_client_leaving_a_whole_response_request_frees_its_sequence(rolling_server):
    aborts_before, disconnects_before = _abort_count(rolling_server), _disconnects(rolling_server)
    body = json.dumps(greedy("Once upon a time", LONG_CONTEXT - 100)).encode()
    address = urlparse(rolling_server.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as client:
        client.sendall(b"POST /invocations HTTP/1.1\r\nHost: test\r\n"
                       b"Content-Type: application/json\r\n"
                       + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert wait_until(lambda: stats(rolling_server)["running"] == 1, timeout=10)
    assert wait_until(lambda: _kv_released(rolling_server, aborts_before)), stats(rolling_server)
    assert _disconnects(rolling_server) == disconnects_before + 1
    assert_still_serving(rolling_server)


def _ping_status(server) -> int:
    return requests.get(server.url + "/ping", timeout=10).status_code


def test_sigterm_refuses_new_requests_while_the_ones_in_flight_finish_then_exits(tiny_llama, tmp_path):
    folder = model_folder(tmp_path, tiny_llama, {"option.rolling_batch": "auto"},
                          {"max_position_embeddings": LONG_CONTEXT})
    server = start_server(folder, QUIET_ENV)
    with server, requests.Session() as idle_client, ThreadPoolExecutor(2) as pool:
        # An idle keep-alive connection, as load balancers hold, must not delay the exit.
        assert idle_client.get(server.url + "/ping", timeout=10).status_code == 200
        in_flight = pool.submit(invoke, server, greedy("Once upon a time", 3000, details=True))
        streaming = pool.submit(lambda: stream_events(invoke(
            server, {**greedy("A stream", 2500), "stream": True}, stream=True), "jsonlines"))
        assert wait_until(lambda: stats(server)["running"] == 2, timeout=10)
        server.process.terminate()  # what docker stop and SageMaker send
        assert wait_until(lambda: _ping_status(server) == 503, timeout=5)
        assert requests.get(server.url + "/ping", timeout=10).json() == {"status": "draining"}
        started = time.monotonic()
        refused = invoke(server, greedy("Too late", 5))
        assert refused.status_code == 503 and time.monotonic() - started < 2
        assert refused.json()["type"] == "ServiceUnavailable"
        assert "shutting down" in refused.json()["message"]
        assert not in_flight.done()  # the 503 did not wait for the drain
        response = in_flight.result(timeout=60)
        assert response.status_code == 200
        assert response.json()["details"]["generated_tokens"] == 3000
        assert len(streaming.result(timeout=60)) == 2500
        assert server.process.wait(timeout=15) == 0  # the drain limit is 25 s


def test_sagemaker_bind_to_port_chooses_the_port(tiny_llama, tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = {**os.environ, **QUIET_ENV, "SAGEMAKER_BIND_TO_PORT": str(port)}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "container.serve", "--model-dir", str(tiny_llama)], env=env,
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    with Server(process, f"http://127.0.0.1:{port}", log_path) as server:
        wait_healthy(server, timeout=120)
        assert_still_serving(server)


# --- refusing to start ---------------------------------------------------------------------------


def run_serve(model_dir: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "container.serve", "--model-dir", str(model_dir),
               "--port", str(free_port())]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def test_invalid_property_stops_serve_before_it_starts(tiny_llama, tmp_path):
    folder = model_folder(tmp_path, tiny_llama, {"option.rolling_batch": "foo"})
    finished = run_serve(folder)
    assert finished.returncode == 2
    assert "invalid configuration" in finished.stderr
    assert "option.rolling_batch='foo'" in finished.stderr
    assert "Listening" not in finished.stdout + finished.stderr


def test_setting_impossible_for_the_model_stops_serve(tiny_llama, tmp_path):
    # Only the loaded model can tell: the tiny model has 512 positions.
    folder = model_folder(tmp_path, tiny_llama, {"option.max_model_len": "4096"})
    finished = run_serve(folder, timeout=120)
    assert finished.returncode != 0
    assert "option.max_model_len=4096" in finished.stderr
    assert "max_position_embeddings" in finished.stderr


def test_missing_model_folder_stops_serve(tmp_path):
    missing = tmp_path / "no-such-model"
    finished = run_serve(missing)
    assert finished.returncode == 2
    assert str(missing) in finished.stderr
    assert "does not exist" in finished.stderr


# --- the aliases users of other servers probe --------------------------------------------------


def test_health_answers_as_ping(paged_server):
    response = requests.get(paged_server.url + "/health", timeout=10)
    assert response.status_code == 200
    assert response.json() == requests.get(paged_server.url + "/ping", timeout=10).json()


def test_tgi_generate_and_generate_stream_answer_like_invocations(paged_server):
    request = greedy("Text generation inference", 6, details=True)
    lmi = invoke(paged_server, request).json()
    whole = requests.post(paged_server.url + "/generate", json={**request, "stream": True}, timeout=30)
    assert whole.status_code == 200 and whole.json() == lmi  # /generate never streams
    streamed = requests.post(paged_server.url + "/generate_stream", json=request, timeout=30, stream=True)
    assert streamed.headers["Content-Type"].startswith("text/event-stream")
    events = stream_events(streamed, "sse")
    assert [event["token"]["id"] for event in events] == [token["id"] for token in lmi["details"]["tokens"]]
    assert events[-1]["generated_text"] == lmi["generated_text"]
    refused = requests.post(paged_server.url + "/generate_stream", json=greedy(["a", "b"], 2), timeout=30)
    assert refused.status_code == 400 and "one prompt" in refused.json()["message"]

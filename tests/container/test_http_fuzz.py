"""A fuzz of malformed requests against a real server: every one is answered 4xx with the JSON
error shape (OpenAI's on /v1), and the server is as healthy afterwards as before (no 5xx, no traceback, no
sequence or KV block left behind)."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlparse

import pytest
import requests

from tests.container.test_serve_http import QUIET_ENV, model_folder
from tests.server import start_server

PAYLOAD_LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    folder = model_folder(tmp_path_factory.mktemp("fuzz"), tiny_llama,
                          {"option.rolling_batch": "auto", "option.paged_attention": "true"})
    with start_server(folder, {**QUIET_ENV, "SAGEMAKER_MAX_PAYLOAD_IN_MB": "1"}) as running:
        yield running


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def generation(**parameters) -> bytes:
    return body(inputs="hi", parameters=parameters)


def chat(**fields) -> bytes:
    return body(messages=[{"role": "user", "content": "hi"}], **fields)


UTF8 = {
    "invalid-byte": b'{"inputs": "caf\xff"}',
    "latin1": b'{"inputs": "caf\xe9"}',
    "overlong-slash": b'{"inputs": "\xc0\xaf"}',
    "truncated-multibyte": b'{"inputs": "\xe6\x97"}',
    "encoded-surrogate": b'{"inputs": "\xed\xa0\x80"}',
    "utf16": '{"inputs": "hi"}'.encode("utf-16"),
    "escaped-surrogate": rb'{"inputs": "\ud800"}',
    "escaped-low-surrogate-in-list": rb'{"inputs": ["ok", "\udc00"]}',
    "surrogate-in-stop": rb'{"inputs": "hi", "parameters": {"stop": ["\ud800"]}}',
    "surrogate-in-key": rb'{"inputs": "hi", "parameters": {"\ud800": 1}}',
    "surrogate-in-chat": rb'{"messages": [{"role": "user", "content": "\udfff"}]}',
    "surrogate-in-text-part": rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}',
    "surrogate-in-ignored-field": rb'{"inputs": "hi", "model": "\ud800"}',
    "reversed-pair": rb'{"inputs": "\ude80\ud83d"}',
}
JSON_SHAPES = {
    "empty": b"",
    "open-brace": b"{",
    "array": b"[]",
    "string": b'"hi"',
    "null": b"null",
    "number": b"42",
    "deeply-nested": b"[" * 100_000 + b"]" * 100_000,
    "nested-in-inputs": b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "nan": b'{"inputs": "hi", "parameters": {"temperature": NaN}}',
    "infinity": b'{"inputs": "hi", "parameters": {"top_p": -Infinity}}',
    "trailing-garbage": b'{"inputs": "hi"} x',
    "inputs-object": body(inputs={"text": "hi"}),
    "parameters-list": body(inputs="hi", parameters=[1, 2]),
    "messages-object": body(messages={"role": "user"}),
    "messages-empty": body(messages=[]),
    "message-number": body(messages=[1]),
    "message-without-content": body(messages=[{"role": "user"}]),
    "message-image-part": body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
    "inputs-and-messages": body(inputs="hi", messages=[{"role": "user", "content": "hi"}]),
    "no-inputs": body(parameters={"max_new_tokens": 3}),
}
TYPES = {
    "max-new-tokens-string": generation(max_new_tokens="10"),
    "max-new-tokens-bool": generation(max_new_tokens=True),
    "max-new-tokens-float": generation(max_new_tokens=2.5),
    "temperature-string": generation(temperature="hot"),
    "top-k-float": generation(top_k=1.5),
    "stop-number": generation(stop=5),
    "stop-empty-string": generation(stop=[""]),
    "stop-list-of-numbers": generation(stop=[1, 2]),
    "do-sample-string": generation(do_sample="yes"),
    "details-number": generation(details=1),
    "stream-string": body(inputs="hi", stream="true"),
    "chat-n-zero": chat(n=0),
    "chat-top-logprobs-without-logprobs": chat(top_logprobs=2),
    "chat-logit-bias-not-a-token": chat(logit_bias={"the": 5}),
    "chat-logprobs-string": chat(logprobs="yes"),
}
RANGES = {
    "max-new-tokens-zero": generation(max_new_tokens=0),
    "max-new-tokens-negative": generation(max_new_tokens=-1),
    "max-new-tokens-huge": generation(max_new_tokens=10**30),
    "temperature-negative": generation(temperature=-1),
    "temperature-overflow": b'{"inputs": "hi", "parameters": {"temperature": 1e400}}',
    "top-p-zero": generation(top_p=0),
    "top-p-above-one": generation(top_p=1.01),
    "min-p-two": generation(min_p=2),
    "repetition-penalty-zero": generation(repetition_penalty=0),
    "presence-penalty-three": generation(presence_penalty=3),
    "seed-negative": generation(seed=-1),
    "seed-2-64": generation(seed=2**64),
    "chat-max-tokens-zero": chat(max_tokens=0),
}
SIZES = {
    "prompt-tokens-over-the-model": body(inputs=" ".join(["pages"] * 2000)),
    "prompt-characters-over-the-model": body(inputs="x" * 900_000),
    "list-prompt-over-the-model": body(inputs=["fine", "x" * 100_000]),
    "50000-stops": generation(stop=["s"] * 50_000),
    "300-kb-stop": generation(stop_sequences=["x" * 300_000]),
    "body-over-the-limit": body(inputs="x" * (2 * PAYLOAD_LIMIT)),
}
JSON_BODIES = {**UTF8, **JSON_SHAPES, **TYPES, **RANGES, **SIZES}


def http_request(payload: bytes, *, path: str = "/invocations", extra: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\n".encode()
            + extra + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)


CHUNKED = b"POST /invocations HTTP/1.1\r\nHost: fuzz\r\nTransfer-Encoding: chunked\r\n\r\n"
# (request bytes, whether to end the sending side after them: for bodies that stop short)
FRAMING = {
    "chunk-size-zz": (CHUNKED + b"zz\r\n{}\r\n0\r\n\r\n", False),
    "chunk-size-negative": (CHUNKED + b"-5\r\n{}\r\n0\r\n\r\n", False),
    # A chunk declared larger than the data that follows: the server waits for the rest, as for
    # any slow client, until the client ends its side.
    "chunk-size-huge": (CHUNKED + b"ffffffffffffffffffff\r\n{}\r\n0\r\n\r\n", True),
    "chunk-missing-terminator": (CHUNKED + b"2\r\n{}XX0\r\n\r\n", False),
    "chunk-bad-extension": (CHUNKED + b"2;\x00bad\r\n{}\r\n0\r\n\r\n", False),
    "chunked-ends-mid-chunk": (CHUNKED + b"10\r\n{\"inp", True),
    "chunked-ends-before-last-chunk": (CHUNKED + b"2\r\n{}\r\n", True),
    "content-length-ends-early": (http_request(b'{"inputs": "hi"}')[:-4], True),
    "request-line-garbage": (b"GARBAGE\r\n\r\n", False),
    "http-version-9": (b"GET /ping HTTP/9.9\r\nHost: fuzz\r\n\r\n", False),
    "lowercase-method": (b"post /invocations HTTP/1.1\r\nHost: fuzz\r\nContent-Length: 2\r\n\r\n{}", False),
    "content-length-letters": (b"POST /invocations HTTP/1.1\r\nHost: fuzz\r\nContent-Length: abc\r\n\r\n{}", False),
    "content-length-negative": (b"POST /invocations HTTP/1.1\r\nHost: fuzz\r\nContent-Length: -2\r\n\r\n{}", False),
    "two-content-lengths": (b"POST /invocations HTTP/1.1\r\nHost: fuzz\r\nContent-Length: 2\r\n"
                            b"Content-Length: 5\r\n\r\n{}", False),
    "content-length-and-chunked": (b"POST /invocations HTTP/1.1\r\nHost: fuzz\r\nContent-Length: 4\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", False),
    "header-without-colon": (b"GET /ping HTTP/1.1\r\nHost: fuzz\r\nNoColonHere\r\n\r\n", False),
    "header-name-with-space": (b"GET /ping HTTP/1.1\r\nHost: fuzz\r\nBad Name: 1\r\n\r\n", False),
    "header-null-byte": (b"GET /ping HTTP/1.1\r\nHost: fuzz\r\nX-A: a\x00b\r\n\r\n", False),
    "folded-header": (b"GET /ping HTTP/1.1\r\nHost: fuzz\r\nX-A: a\r\n  b\r\n\r\n", False),
    "too-many-headers": (b"GET /ping HTTP/1.1\r\nHost: fuzz\r\n" + b"X-Many: 1\r\n" * 200 + b"\r\n", False),
    "header-line-too-long": (b"GET /ping HTTP/1.1\r\nHost: fuzz\r\nX-Long: " + b"a" * 10_000 + b"\r\n\r\n", False),
    "request-line-too-long": (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: fuzz\r\n\r\n", False),
    "expect-unknown": (http_request(b"{}", extra=b"Expect: 200-ok\r\n"), False),
    "get-on-invocations": (b"GET /invocations HTTP/1.1\r\nHost: fuzz\r\n\r\n", False),
    "unknown-route": (b"GET /nowhere HTTP/1.1\r\nHost: fuzz\r\n\r\n", False),
}


def exchange(server, data: bytes, *, end_input: bool, timeout: float = 20) -> bytes:
    """Send ``data`` on a new connection; return the first response (headers and body)."""
    address = urlparse(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=timeout) as client:
        client.sendall(data)
        if end_input:
            client.shutdown(socket.SHUT_WR)
        received = b""
        while b"\r\n\r\n" not in received or len(received) < _response_length(received):
            chunk = client.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


def _response_length(received: bytes) -> int:
    head, _, _ = received.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + 4 + int(value)
    return len(received) + 1  # no length: read until the server closes


def assert_json_4xx(reply: bytes) -> dict:
    head, _, rest = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert 400 <= status < 500, reply[:600]
    assert b"content-type: application/json" in head.lower(), reply[:600]
    body = json.loads(rest[:_response_length(reply) - len(head) - 4])
    error = body.get("error", body)  # OpenAI's {"error": {...}} on /v1 routes
    assert error["code"] == status and error["type"] and error["message"], error
    return error


@pytest.mark.parametrize("name", list(JSON_BODIES))
def test_malformed_json_body_is_a_json_4xx(server, name):
    for route in ("/invocations", "/v1/chat/completions"):
        assert_json_4xx(exchange(server, http_request(JSON_BODIES[name], path=route), end_input=False))


@pytest.mark.parametrize("name", list(FRAMING))
def test_malformed_http_framing_is_a_json_4xx(server, name):
    data, end_input = FRAMING[name]
    assert_json_4xx(exchange(server, data, end_input=end_input))


def test_the_fuzz_is_big_enough():
    assert len(JSON_BODIES) * 2 + len(FRAMING) >= 50


def test_server_is_healthy_after_the_fuzz(server):
    # Runs last in this module (pytest keeps file order): everything above went through.
    assert requests.get(server.url + "/ping", timeout=10).json()["status"] == "healthy"
    answer = requests.post(server.url + "/invocations", timeout=60, json={
        "inputs": "Paris is", "parameters": {"max_new_tokens": 4, "ignore_eos": True, "details": True}})
    assert answer.status_code == 200 and answer.json()["details"]["generated_tokens"] == 4
    stats = requests.get(server.url + "/stats", timeout=10).json()
    assert (stats["running"], stats["waiting"], stats["kv_tokens_reserved"]) == (0, 0, 0)
    assert stats["requests_failed"] == {} and stats["healthy"]
    logs = server.logs()
    assert "Traceback" not in logs and '" 500 ' not in logs, logs[-3000:]

"""The load generator's parsing and arithmetic, against known timings and a small stand-in server
that speaks the LMI jsonlines protocol (the real server is exercised in test_compare.py)."""

from __future__ import annotations

import itertools
import json
import threading
import time

import pytest
import requests
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from benchmarks import loadgen
from benchmarks.loadgen import RequestResult
from benchmarks.workloads import RequestSpec, build_workload

# --- metrics arithmetic on known timings ---------------------------------------------------


def _result(index, *, ttft, e2e, itl, tokens, prompt=10, status=200, start=0.0):
    return RequestResult(index=index, max_new_tokens=tokens, start=start, status=status, ttft=ttft, e2e=e2e,
                         itl=list(itl), output_tokens=tokens, prompt_tokens=prompt)


def test_summary_figures_follow_the_vllm_definitions():
    results = [
        _result(0, ttft=0.1, e2e=1.1, itl=[0.2] * 5, tokens=6),  # TPOT (1.1 - 0.1) / 5 = 0.2
        _result(1, ttft=0.3, e2e=0.7, itl=[0.1] * 4, tokens=5),  # TPOT (0.7 - 0.3) / 4 = 0.1
    ]
    summary = loadgen.summarize(results, duration=2.0)

    assert summary["completed"] == 2 and summary["failed"] == 0
    assert summary["request_throughput"] == pytest.approx(1.0)
    assert summary["output_throughput"] == pytest.approx(11 / 2.0)
    assert summary["total_token_throughput"] == pytest.approx((11 + 20) / 2.0)
    assert summary["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert summary["tpot_ms"]["mean"] == pytest.approx(150.0)
    assert summary["e2e_ms"]["p50"] == pytest.approx(900.0)
    # ITL pools every gap of every request: five of 200 ms, four of 100 ms.
    assert summary["itl_ms"]["mean"] == pytest.approx((5 * 200 + 4 * 100) / 9)
    assert summary["itl_ms"]["p50"] == pytest.approx(200.0)
    assert summary["itl_ms"]["p90"] == pytest.approx(200.0)
    assert summary["wrong_output_length"] == 0


def test_percentiles_interpolate_between_samples():
    stats = loadgen.distribution([0.001 * v for v in range(1, 101)])  # 1 .. 100 ms
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert loadgen.distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_tpot_is_undefined_for_a_single_token():
    assert _result(0, ttft=0.1, e2e=0.1, itl=[], tokens=1).tpot is None
    assert _result(0, ttft=0.1, e2e=0.5, itl=[0.4], tokens=2).tpot == pytest.approx(0.4)


def test_failed_requests_are_counted_by_status_and_listed_not_dropped():
    ok = _result(0, ttft=0.1, e2e=1.0, itl=[0.3] * 3, tokens=4)
    bad = RequestResult(index=1, max_new_tokens=4, status=400, error_type="BadRequestError", error_message="too long")
    busy = RequestResult(index=2, max_new_tokens=4, status=503, error_type="ServiceUnavailableError",
                         error_message="queue full")
    refused = RequestResult(index=3, max_new_tokens=4, status=0, error_type="ConnectionError", error_message="refused")
    summary = loadgen.summarize([ok, bad, busy, refused], duration=1.0)

    assert summary["num_requests"] == 4
    assert summary["completed"] == 1 and summary["failed"] == 3
    assert summary["errors_by_status"] == {"0": 1, "400": 1, "503": 1}
    assert {(f["index"], f["status"], f["message"]) for f in summary["failures"]} == {
        (1, 400, "too long"), (2, 503, "queue full"), (3, 0, "refused")}
    # Throughput counts completed requests only; latencies come from them only.
    assert summary["request_throughput"] == pytest.approx(1.0)
    assert summary["e2e_ms"]["mean"] == pytest.approx(1000.0)
    report = loadgen.format_report(summary)
    assert "HTTP 400 BadRequestError: too long" in report and "Failed requests" in report


def test_an_output_of_the_wrong_length_is_reported():
    short = RequestResult(index=0, max_new_tokens=8, status=200, ttft=0.1, e2e=0.2, output_tokens=3)
    assert loadgen.summarize([short], 1.0)["wrong_output_length"] == 1


# --- stream parsing with a fake clock ----------------------------------------------------------


def _lines(n, prompt_tokens=7):
    for i in range(n):
        chunk = {"token": {"id": i, "text": f"t{i}", "log_prob": -0.5}}
        if i == n - 1:
            chunk["generated_text"] = "".join(f"t{j}" for j in range(n))
            chunk["details"] = {"finish_reason": "length", "generated_tokens": n, "prompt_tokens": prompt_tokens}
        yield json.dumps(chunk).encode()


def test_stream_timings_come_from_token_chunks():
    ticks = iter([1.25, 1.5, 2.0, 2.25])  # the clock when each line arrives
    result = RequestResult(index=0, max_new_tokens=4)
    lines = itertools.chain([b""], _lines(4))  # keep-alive blank lines are not tokens
    loadgen._read_stream(result, lines, lambda: next(ticks), start=1.0)

    assert result.output_tokens == 4
    assert result.prompt_tokens == 7
    assert result.ttft == pytest.approx(0.25)
    assert result.itl == pytest.approx([0.25, 0.5, 0.25])
    assert result.error_type is None


def test_an_error_line_in_the_middle_of_a_stream_fails_the_request():
    error = json.dumps({"code": 424, "type": "ModelError", "message": "the model failed"}).encode()
    result = RequestResult(index=0, max_new_tokens=4, status=200)
    loadgen._read_stream(result, [*itertools.islice(_lines(4), 2), error], time.perf_counter, 0.0)

    assert not result.ok
    assert (result.status, result.error_type, result.error_message) == (424, "ModelError", "the model failed")
    assert result.output_tokens == 2


# --- against a stand-in server over HTTP -------------------------------------------------------


class StandIn:
    """A threaded WSGI server answering /invocations in the LMI protocol: ``max_new_tokens``
    token lines ``delay`` seconds apart; prompts starting with "bad" get a 400 error body,
    "busy" a 503. Records how many requests were in flight at most."""

    def __init__(self, delay: float = 0.02):
        self.delay = delay
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def app(self, environ, start_response):
        request = Request(environ)
        if request.path == "/stats":
            stats = {"running": 2, "waiting": 0, "kv_tokens_reserved": 64, "kv_tokens_in_use": 48,
                     "kv_capacity_tokens": 128, "max_batch_size": 3, "preemptions": 1,
                     "blocks": {"prefix_hit_rate": 0.5}}
            return Response(json.dumps(stats), mimetype="application/json")(environ, start_response)
        body = request.get_json()
        prompt, n = body["inputs"], body["parameters"]["max_new_tokens"]
        for prefix, status, kind in (("bad", 400, "BadRequestError"), ("busy", 503, "ServiceUnavailableError")):
            if prompt.startswith(prefix):
                error = {"code": status, "type": kind, "message": f"refused {prompt}"}
                return Response(json.dumps(error), status=status, mimetype="application/json")(environ, start_response)
        if not body.get("stream"):
            time.sleep(self.delay * n)
            payload = {"generated_text": "x" * n, "details": {"generated_tokens": n, "prompt_tokens": 5}}
            return Response(json.dumps(payload), mimetype="application/json")(environ, start_response)
        return Response(self._stream(n), mimetype="application/jsonlines")(environ, start_response)

    def _stream(self, n):
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            for line in _lines(n, prompt_tokens=5):
                time.sleep(self.delay)
                yield line + b"\n"
        finally:
            with self.lock:
                self.in_flight -= 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def test_streaming_over_http_measures_the_first_token_before_the_end():
    with StandIn(delay=0.05) as server:
        result = loadgen.send_request(requests.Session(), server.url, RequestSpec("hello", 6), 0)
    assert result.ok and result.output_tokens == 6 and result.prompt_tokens == 5
    assert len(result.itl) == 5
    # The first token arrives after one delay, the whole stream after six: chunks are not buffered.
    assert 0.04 < result.ttft < 0.2
    assert result.e2e > result.ttft + 0.2


def test_non_streaming_requests_count_tokens_from_details():
    with StandIn(delay=0.001) as server:
        result = loadgen.send_request(requests.Session(), server.url, RequestSpec("hello", 6), 0, stream=False)
    assert result.ok and result.output_tokens == 6 and result.ttft is None


def test_closed_loop_keeps_exactly_the_concurrency_in_flight_and_keeps_every_error():
    specs = [RequestSpec("bad prompt" if i == 4 else "busy" if i == 7 else f"p{i}", 5) for i in range(12)]
    with StandIn(delay=0.02) as server:
        summary = loadgen.benchmark(server.url, specs, concurrency=3, progress=False, stats_interval=0.05)
    assert server.max_in_flight == 3
    assert summary["completed"] == 10 and summary["failed"] == 2
    assert summary["errors_by_status"] == {"400": 1, "503": 1}
    assert sorted(f["index"] for f in summary["failures"]) == [4, 7]
    assert summary["total_output_tokens"] == 50
    assert summary["kv"]["kv_waste_mean"] == pytest.approx(0.25)  # 1 - 48/64 from /stats samples
    assert summary["kv"]["max_batch_size"] == 3 and summary["kv"]["prefix_hit_rate"] == 0.5


def test_an_unreachable_server_fails_every_request_with_status_0():
    with StandIn() as server:
        url = server.url
    results, _ = loadgen.run_load(url, [RequestSpec("x", 2)] * 3, concurrency=2, progress=False, timeout=2)
    assert [r.status for r in results] == [0, 0, 0]
    assert all(r.error_type for r in results)


def test_poisson_arrivals_are_seeded_and_open_loop_waits_for_them():
    arrivals = loadgen.poisson_arrivals(2000, request_rate=50.0, seed=3)
    assert arrivals == loadgen.poisson_arrivals(2000, request_rate=50.0, seed=3)
    assert arrivals[0] == 0.0 and all(b >= a for a, b in zip(arrivals, arrivals[1:]))
    assert arrivals[-1] / 1999 == pytest.approx(1 / 50.0, rel=0.1)  # mean gap 1/rate

    specs = [RequestSpec(f"p{i}", 2) for i in range(6)]
    expected = loadgen.poisson_arrivals(6, request_rate=20.0, seed=1)
    with StandIn(delay=0.001) as server:
        results, _ = loadgen.run_load(server.url, specs, concurrency=6, request_rate=20.0, seed=1, progress=False)
    assert all(r.ok for r in results)
    assert all(r.start >= arrival - 0.005 for r, arrival in zip(results, expected))


# --- workloads -------------------------------------------------------------------------------


def test_seed_workload_has_the_blog_shape_and_scales_output_lengths():
    full = build_workload("seed", num_requests=6)
    assert full.concurrency == 50
    assert [r.max_new_tokens for r in full.requests] == [64, 128, 256] * 2
    assert len({r.prompt for r in full.requests}) == 3
    small = build_workload("seed", num_requests=3, scale=0.125, concurrency=4)
    assert [r.max_new_tokens for r in small.requests] == [8, 16, 32]
    assert small.concurrency == 4


def test_workloads_are_deterministic_given_a_seed(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    for name in ("memory-bound", "shared-prefix"):
        assert build_workload(name, seed=1, tokenizer=tokenizer) == build_workload(name, seed=1, tokenizer=tokenizer)
    assert build_workload("memory-bound", seed=1).requests != build_workload("memory-bound", seed=2).requests


def test_memory_bound_prompts_have_the_documented_token_lengths_and_fit(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    workload = build_workload("memory-bound", num_requests=40, tokenizer=tokenizer)
    lengths = [len(tokenizer.encode(r.prompt, add_special_tokens=False)) for r in workload.requests]
    assert min(lengths) >= 14 and max(lengths) <= 164
    max_model_len = int(workload.server_options["option.max_model_len"])
    capacity = int(workload.server_options["option.max_kv_cache_tokens"])
    # Contiguous slots: capacity / max_model_len sequences; every request fits one slot.
    assert capacity // max_model_len == 4
    assert all(n + r.max_new_tokens < max_model_len for n, r in zip(lengths, workload.requests))


def test_shared_prefix_requests_share_a_long_system_prompt():
    workload = build_workload("shared-prefix", num_requests=8)
    prompts = [r.prompt for r in workload.requests]
    common = prompts[0].split("\nQuestion")[0]
    assert len(common.split()) >= 300
    assert all(p.startswith(common + "\nQuestion") for p in prompts)
    assert len(set(prompts)) == len(prompts)


def test_peers_workload_has_distinct_prompts_of_about_fifty_tokens(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    workload = build_workload("peers", num_requests=12, concurrency=32, tokenizer=tokenizer)
    lengths = [len(tokenizer.encode(r.prompt, add_special_tokens=False)) for r in workload.requests]
    assert all(45 <= n <= 55 for n in lengths), lengths
    assert len({r.prompt for r in workload.requests}) == 12  # no prefix-cache luck for anyone
    assert {r.max_new_tokens for r in workload.requests} == {64} and workload.concurrency == 32


def test_unknown_workload_names_the_choices():
    with pytest.raises(ValueError, match="seed, peers, memory-bound, shared-prefix"):
        build_workload("nope")


class OpenAIStandIn(StandIn):
    """Answers /v1/completions as vLLM and llama.cpp do: SSE chunks of one token, then a usage
    chunk (when asked for) and ``data: [DONE]``; or one JSON object."""

    def app(self, environ, start_response):
        body = Request(environ).get_json()
        n = body["max_tokens"]
        if not body.get("stream"):
            payload = {"choices": [{"text": "x" * n, "finish_reason": "length"}],
                       "usage": {"prompt_tokens": 5, "completion_tokens": n}}
            return Response(json.dumps(payload), mimetype="application/json")(environ, start_response)
        include_usage = (body.get("stream_options") or {}).get("include_usage")

        def events():
            for _ in range(n):
                time.sleep(self.delay)
                yield b'data: {"choices": [{"text": "x", "finish_reason": null}]}\n\n'
            if include_usage:
                yield b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": %d}}\n\n' % n
            yield b"data: [DONE]\n\n"
        return Response(events(), mimetype="text/event-stream")(environ, start_response)


def test_openai_completions_client_reads_sse_chunks_and_usage():
    server = OpenAIStandIn(delay=0.01)
    server.thread.start()
    try:
        specs = [RequestSpec("a prompt", 6), RequestSpec("another", 3)]
        summary = loadgen.benchmark(server.url, specs, concurrency=2, progress=False,
                                    api=loadgen.OpenAICompletions("m"))
        whole = loadgen.benchmark(server.url, specs, concurrency=2, progress=False, stream=False,
                                  api=loadgen.OpenAICompletions("m"))
    finally:
        server.server.shutdown()
    assert summary["completed"] == 2 and summary["total_output_tokens"] == 9 and summary["wrong_output_length"] == 0
    assert summary["total_prompt_tokens"] == 10 and summary["ttft_ms"]["p50"] > 0
    assert summary["itl_ms"]["p50"] >= 5  # one gap per chunk after the first, ~10 ms apart
    assert summary["load"]["api"] == "openai-completions"
    assert whole["total_output_tokens"] == 9 and whole["completed"] == 2

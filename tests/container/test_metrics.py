"""Prometheus ``/metrics`` of a real ``serve``, scraped and parsed with prometheus_client's own
text parser: counters move with the requests sent, whichever of two gunicorn workers answers.

The paged server runs two workers (two model copies) over a KV cache of 16 blocks each, so a
request with three long choices preempts; the dynamic server holds a lone request for a batch
that never fills, past its 1 s ``option.predict_timeout``.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.container.test_serve_http import QUIET_ENV, model_folder, wait_until
from tests.server import start_server

NUM_BLOCKS = 16


@pytest.fixture(scope="module")
def paged(tiny_llama, tmp_path_factory):
    folder = model_folder(tmp_path_factory.mktemp("metrics"), tiny_llama, {
        "option.rolling_batch": "auto", "option.enable_prefix_caching": "true", "maxWorkers": "2",
        "option.max_kv_cache_tokens": str(NUM_BLOCKS * 16), "option.served_model_name": "tiny"})
    with start_server(folder, QUIET_ENV) as server:
        # /ping answered by one worker; both engines run once each reports its 16 free blocks.
        assert wait_until(lambda: total(scrape(server), "lmi:kv_cache_blocks", state="free") == 2 * NUM_BLOCKS,
                          timeout=120), server.logs()
        yield server


def scrape(server) -> dict[tuple[str, frozenset], float]:
    """Every sample of ``/metrics``: (sample name, labels) -> value."""
    response = requests.get(server.url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and wanted <= sample_labels)


def growth(before: dict, after: dict, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def generate(server, prompt: str, max_new_tokens: int) -> requests.Response:
    return requests.post(server.url + "/invocations", timeout=60, json={
        "inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos": True}})


def test_counters_and_histograms_move_with_requests(paged):
    before = scrape(paged)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: generate(paged, f"Request {i} says", 5), range(12)))
    assert [answer.status_code for answer in answers] == [200] * 12
    refused = requests.post(paged.url + "/invocations", json={"inputs": ""}, timeout=10)
    assert refused.status_code == 400
    # NOTE: the engine reports a request's end and its step's totals just after emitting the
    # last token, so a scrape may come a moment before them.
    assert wait_until(lambda: growth(before, scrape(paged), "lmi:generation_tokens_total") == 60
                      and growth(before, scrape(paged), "lmi:request_success_total") == 12)
    after = scrape(paged)

    def grew(name: str, **labels: str) -> float:
        return growth(before, after, name, **labels)

    assert grew("lmi:http_requests_total", route="/invocations", status="200", model_name="tiny") == 12
    assert grew("lmi:http_requests_total", route="/invocations", status="400") == 1
    assert grew("lmi:request_success_total", finished_reason="length") == 12
    assert grew("lmi:generation_tokens_total") == 60
    assert grew("lmi:prompt_tokens_total") >= 12 * 3
    for histogram in ("lmi:time_to_first_token_seconds", "lmi:e2e_request_latency_seconds",
                      "lmi:request_queue_time_seconds", "lmi:request_time_per_output_token_seconds"):
        assert grew(histogram + "_count") == 12, histogram
        assert grew(histogram + "_sum") > 0, histogram
    assert grew("lmi:e2e_request_latency_seconds_bucket", le="+Inf") == 12


def test_every_worker_answers_the_same_merged_numbers(paged):
    # Each worker has 16 blocks: the free-block gauge of the two live workers sums to 32.
    assert wait_until(lambda: total(scrape(paged), "lmi:kv_cache_blocks", state="free") == 2 * NUM_BLOCKS,
                      timeout=10), scrape(paged)
    samples = scrape(paged)
    assert total(samples, "lmi:kv_cache_usage_perc") == 0
    assert total(samples, "lmi:kv_cache_blocks", state="used") == 0
    assert total(samples, "lmi:num_requests_running") == 0 and total(samples, "lmi:num_requests_waiting") == 0
    counts = {total(scrape(paged), "lmi:http_requests_total", route="/invocations") for _ in range(8)}
    assert len(counts) == 1, counts  # whichever worker answered the scrape


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_preemptions_prefix_hits_and_openai_routes_are_counted(paged):
    before = scrape(paged)
    # Three choices of 100 tokens need 3 x 7 blocks of the worker's 16: the newest is preempted.
    # The later choices take the first one's prompt blocks from the prefix cache.
    prompt = "A long shared prompt that fills more than one block of sixteen tokens for sure. " * 2
    answer = sdk(paged).completions.create(model="tiny", prompt=prompt, max_tokens=100, n=3,
                                           temperature=1.0, seed=1, extra_body={"ignore_eos": True})
    assert [choice.finish_reason for choice in answer.choices] == ["length"] * 3
    assert wait_until(lambda: growth(before, scrape(paged), "lmi:generation_tokens_total") == 300
                      and growth(before, scrape(paged), "lmi:request_success_total", finished_reason="length") == 3)
    after = scrape(paged)
    assert growth(before, after, "lmi:num_preemptions_total") > 0
    hits = growth(before, after, "lmi:prefix_cache_hits_total")
    assert hits >= 2 * 16 * ((answer.usage.prompt_tokens - 1) // 16)
    assert growth(before, after, "lmi:prefix_cache_queries_total") >= hits
    assert growth(before, after, "lmi:http_requests_total", route="/v1/completions", status="200") == 1


def test_a_client_that_leaves_is_counted_as_aborted(paged):
    before = total(scrape(paged), "lmi:request_aborted_total", reason="client_disconnected")
    response = requests.post(paged.url + "/invocations", stream=True, timeout=30, json={
        "inputs": "Once upon a time", "stream": True, "parameters": {"max_new_tokens": 200, "ignore_eos": True}})
    lines = response.iter_lines()
    assert json.loads(next(lines))["token"]
    response.close()
    assert wait_until(lambda: total(scrape(paged), "lmi:request_aborted_total", reason="client_disconnected")
                      == before + 1, timeout=10)


def test_a_request_past_the_predict_timeout_is_counted(tiny_llama, tmp_path):
    folder = model_folder(tmp_path, tiny_llama, {"batch_size": "4", "max_batch_delay": "30000",
                                                 "option.predict_timeout": "1"})
    with start_server(folder, QUIET_ENV) as server:
        response = generate(server, "Alone", 3)
        assert response.status_code == 504
        samples = scrape(server)
        assert total(samples, "lmi:http_requests_total", route="/invocations", status="504") == 1
        assert wait_until(lambda: total(scrape(server), "lmi:request_aborted_total", reason="timeout") == 1)
        assert total(scrape(server), "lmi:request_success_total") == 0

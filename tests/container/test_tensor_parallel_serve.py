"""``option.tensor_parallel_degree=2`` through ``serve``: the worker is rank 0 and supervises
rank 1; a rank that dies turns ``/ping`` and the request in flight into 503, and the server exits
without leaving a rank behind (the platform then replaces the container)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import requests

from tests.server import start_server


def _rank_processes() -> dict[int, str]:
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split(None, 1)[0]): line for line in listing.splitlines() if "batching.tensor_parallel" in line}


def test_two_ranks_serve_and_a_dead_rank_stops_the_copy(tiny_llama, tmp_path):
    before = set(_rank_processes())
    env = {"OPTION_TENSOR_PARALLEL_DEGREE": "2", "OPTION_MAX_KV_CACHE_TOKENS": "2048", "OPTION_MAX_MODEL_LEN": "512"}
    with start_server(tiny_llama, env, timeout=180) as server:
        ranks = set(_rank_processes()) - before
        assert len(ranks) == 1, "rank 1 runs beside the worker"
        answer = requests.post(server.url + "/invocations", json={"inputs": "The capital of France is",
                               "parameters": {"max_new_tokens": 8}}, timeout=60)
        assert answer.status_code == 200, answer.text

        outcome = {}

        def long_request():
            outcome["response"] = requests.post(server.url + "/invocations", timeout=120, json={
                "inputs": "Once upon a time", "parameters": {"max_new_tokens": 400, "ignore_eos": True}})

        client = threading.Thread(target=long_request)
        client.start()
        time.sleep(1.0)  # the request is decoding
        os.kill(ranks.pop(), signal.SIGKILL)
        client.join(timeout=60)
        assert not client.is_alive(), "the request in flight must not hang"
        assert outcome["response"].status_code == 503, outcome["response"].text
        try:
            assert requests.get(server.url + "/ping", timeout=5).status_code == 503
        except requests.ConnectionError:
            pass  # already gone: the copy exits a moment after it turns unhealthy
        status = server.process.wait(timeout=60)
        assert status != 0
        assert "tensor-parallel rank 1 exited" in server.logs()
    assert set(_rank_processes()) - before == set(), "no rank outlives the server"

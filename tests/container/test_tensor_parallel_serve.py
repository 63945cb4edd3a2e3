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


def _ranks_of(server_pid: int) -> set[int]:
    """Rank processes started by this server's workers (other servers may run on the machine).
    NOTE: ``-ww``: without it ps cuts command lines at 80 columns when its output is not a
    terminal, and a long checkout path pushes the module name out of them."""
    listing = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in listing.splitlines()]
    workers = {int(pid) for pid, ppid, *_ in rows if int(ppid) == server_pid}
    return {int(pid) for pid, ppid, *args in rows
            if int(ppid) in workers and args and "batching.tensor_parallel" in args[0]}


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _alive(pid)


def test_two_ranks_serve_and_a_dead_rank_stops_the_copy(tiny_llama, tmp_path):
    env = {"OPTION_TENSOR_PARALLEL_DEGREE": "2", "OPTION_MAX_KV_CACHE_TOKENS": "2048", "OPTION_MAX_MODEL_LEN": "512"}
    with start_server(tiny_llama, env, timeout=180) as server:
        ranks = _ranks_of(server.process.pid)
        assert len(ranks) == 1, "rank 1 runs beside the worker"
        [rank] = ranks
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
        os.kill(rank, signal.SIGKILL)
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
    assert _wait_gone(rank, 10)


def test_a_rank_exits_when_its_serving_process_dies(tiny_llama):
    """No orphans: the worker (rank 0) is killed outright, and its rank 1 follows it."""
    env = {"OPTION_TENSOR_PARALLEL_DEGREE": "2", "OPTION_MAX_KV_CACHE_TOKENS": "2048", "OPTION_MAX_MODEL_LEN": "512"}
    with start_server(tiny_llama, env, timeout=180) as server:
        [rank] = _ranks_of(server.process.pid)
        worker = int(subprocess.run(["ps", "-o", "ppid=", "-p", str(rank)], capture_output=True,
                                    text=True).stdout.strip())
        os.kill(worker, signal.SIGKILL)
        assert _wait_gone(rank, 15), "rank 1 outlived its serving process"

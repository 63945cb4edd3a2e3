"""CPU threads per model copy: ``option.cpu_threads``, else a user's OMP_NUM_THREADS, else the
cores this process may use divided among the copies; set before the workers start."""

from __future__ import annotations

import os

import requests

from container.serve import set_cpu_threads
from djl_like.config import ServingConfig
from tests.server import start_server


def test_the_setting_wins_then_the_users_variable_then_a_share_of_the_cores():
    env = {"OMP_NUM_THREADS": "7"}
    assert set_cpu_threads(ServingConfig(cpu_threads=3), env) == "3"
    assert env == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    assert set_cpu_threads(ServingConfig(), {"OMP_NUM_THREADS": "5"}) == "5"
    cores = len(os.sched_getaffinity(0))
    env = {}
    assert set_cpu_threads(ServingConfig(num_workers=2), env) == str(max(1, cores // 2))
    assert env["OMP_NUM_THREADS"] == str(max(1, cores // 2))


def test_the_worker_computes_with_the_configured_threads(tiny_llama, tmp_path):
    env = {"OPTION_CPU_THREADS": "1", "OPTION_MAX_KV_CACHE_TOKENS": "1024", "OPTION_MAX_MODEL_LEN": "256"}
    env_without_omp = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    os.environ.pop("OMP_NUM_THREADS", None)
    try:
        with start_server(tiny_llama, env, timeout=180) as server:
            assert requests.get(server.url + "/stats", timeout=10).json()["cpu_threads"] == 1
            assert "1 CPU thread(s) each" in server.logs()
    finally:
        os.environ.clear()
        os.environ.update(env_without_omp)

"""The Flask app on a real werkzeug server thread: health while loading, after a failure, after
the engine stops, and the predict timeout."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from werkzeug.serving import make_server

from batching.offline import create_engine
from container.app import create_app
from djl_like.config import ServingConfig, Strategy


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Serve ``app`` on a free port in a thread; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def paged_config(model_path) -> ServingConfig:
    return ServingConfig(model_dir=str(model_path), strategy=Strategy.PAGED, device="cpu",
                         max_kv_cache_tokens=4096)


def ping(url: str) -> requests.Response:
    return requests.get(url + "/ping", timeout=10)


def wait_for_status(url: str, status: int, timeout: float = 60) -> requests.Response:
    deadline = time.monotonic() + timeout
    response = ping(url)
    while response.status_code != status and time.monotonic() < deadline:
        time.sleep(0.1)
        response = ping(url)
    return response


def test_ping_is_503_while_loading_then_200(tiny_llama):
    release = threading.Event()

    def slow_factory(config, model_path):
        release.wait(timeout=60)
        return create_engine(config, model_path)

    app = create_app(paged_config(tiny_llama), str(tiny_llama), engine_factory=slow_factory)
    with serving(app) as url:
        loading = ping(url)
        assert loading.status_code == 503
        assert loading.json() == {"status": "loading"}
        early = requests.post(url + "/invocations", json={"inputs": "hi"}, timeout=10)
        assert early.status_code == 503
        assert early.json()["type"] == "ServiceUnavailable"
        assert requests.get(url + "/stats", timeout=10).status_code == 503
        # /v1/models is a readiness probe too (vLLM and TGI answer nothing before the model loads)
        models = requests.get(url + "/v1/models", timeout=10)
        assert models.status_code == 503 and "still loading" in models.json()["error"]["message"]
        release.set()
        ready = wait_for_status(url, 200)
        assert ready.json() == {"status": "healthy", "strategy": "paged"}
        assert requests.get(url + "/v1/models", timeout=10).status_code == 200
        answer = requests.post(url + "/invocations", timeout=30, json={
            "inputs": "hi", "parameters": {"max_new_tokens": 3, "ignore_eos": True,
                                           "details": True}})
        assert answer.status_code == 200
        assert answer.json()["details"]["generated_tokens"] == 3
        app.extensions["lmi_engine_loader"].engine().shutdown()


def broken_factory(config, model_path):
    raise OSError("model.safetensors is truncated")


def test_ping_is_503_unhealthy_when_loading_fails(tiny_llama):
    app = create_app(paged_config(tiny_llama), str(tiny_llama), engine_factory=broken_factory)
    with serving(app) as url:
        assert app.extensions["lmi_engine_loader"].loaded.wait(10)
        response = ping(url)
        assert response.status_code == 503
        assert response.json()["status"] == "unhealthy"
        assert "model.safetensors is truncated" in response.json()["message"]
        refused = requests.post(url + "/invocations", json={"inputs": "hi"}, timeout=10)
        assert refused.status_code == 503
        assert "truncated" in refused.json()["message"]


def test_ping_is_503_unhealthy_once_the_engine_stopped(tiny_llama):
    app = create_app(paged_config(tiny_llama), str(tiny_llama))
    with serving(app) as url:
        assert wait_for_status(url, 200).status_code == 200
        app.extensions["lmi_engine_loader"].engine().shutdown()
        response = ping(url)
        assert response.status_code == 503
        assert response.json()["status"] == "unhealthy"
        refused = requests.post(url + "/invocations", json={"inputs": "hi"}, timeout=10)
        assert refused.status_code == 503


def test_request_waiting_past_predict_timeout_is_a_504_and_leaves_the_queue(tiny_llama):
    # A dynamic batch of 4 that waits 30 s to fill: one lone request is still queued at the
    # 1 s predict timeout, so it must be answered 504 and removed from the queue.
    config = ServingConfig(model_dir=str(tiny_llama), strategy=Strategy.DYNAMIC, batch_size=4,
                           max_batch_delay_ms=30_000, predict_timeout_s=1.0, device="cpu")
    app = create_app(config, str(tiny_llama))
    with serving(app) as url:
        assert wait_for_status(url, 200).status_code == 200
        started = time.monotonic()
        response = requests.post(url + "/invocations", json={"inputs": "hi"}, timeout=30)
        assert response.status_code == 504
        assert response.json()["type"] == "RequestTimeout"
        assert response.json()["message"] == ("no result within option.predict_timeout (1 s); "
                                              "the request was aborted")
        assert time.monotonic() - started < 10
        deadline = time.monotonic() + 5
        while requests.get(url + "/stats", timeout=10).json()["waiting"] and (
                time.monotonic() < deadline):
            time.sleep(0.1)
        stats = requests.get(url + "/stats", timeout=10).json()
        assert stats["waiting"] == 0
        assert stats["requests_finished"] == {"abort": 1}
        assert stats["requests_aborted"] == {"timeout": 1}
        app.extensions["lmi_engine_loader"].engine().shutdown()


@pytest.mark.parametrize("route", ["/invocations", "/v1/chat/completions"])
def test_get_on_a_post_route_is_a_json_405(tiny_llama, route):
    app = create_app(paged_config(tiny_llama), str(tiny_llama), engine_factory=broken_factory)
    with serving(app) as url:
        response = requests.get(url + route, timeout=10)
        assert response.status_code == 405
        body = response.json()
        assert (body["error"] if route.startswith("/v1/") else body)["code"] == 405  # OpenAI's shape on /v1


def test_draining_refuses_new_requests_and_ending_fails_those_left(tiny_llama):
    # A dynamic batch of 4 that waits 30 s to fill: a lone request stays in flight until ended.
    config = ServingConfig(model_dir=str(tiny_llama), strategy=Strategy.DYNAMIC, batch_size=4,
                           max_batch_delay_ms=30_000, device="cpu")
    app = create_app(config, str(tiny_llama))
    drain = app.extensions["lmi_drain"]
    with serving(app) as url, ThreadPoolExecutor(1) as pool:
        assert wait_for_status(url, 200).status_code == 200
        in_flight = pool.submit(requests.post, url + "/invocations", json={"inputs": "hi"}, timeout=60)
        deadline = time.monotonic() + 10
        while drain.num_in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        drain.begin()  # what the gunicorn worker does on SIGTERM
        assert ping(url).status_code == 503 and ping(url).json() == {"status": "draining"}
        refused = requests.post(url + "/invocations", json={"inputs": "hi"}, timeout=10)
        assert refused.status_code == 503 and "shutting down" in refused.json()["message"]
        assert requests.get(url + "/stats", timeout=10).status_code == 200  # still observable
        assert drain.num_in_flight == 1
        drain.end()  # the drain's time is up
        cut = in_flight.result(timeout=30)
        assert cut.status_code == 503 and "shut down before this request finished" in cut.json()["message"]
        assert drain.num_in_flight == 0

"""Prometheus metrics of one worker, served at ``GET /metrics``.

Names mirror vLLM's (``vllm:num_requests_running`` here is ``lmi:num_requests_running``, and so
on) with the ``lmi:`` prefix; every series carries vLLM's ``model_name`` label. The engine
reports through ``EngineMetrics`` (an ``EngineObserver``, called from the engine thread); the
Flask app counts HTTP responses.

NOTE: under ``serve``, gunicorn runs one process per model copy and a scrape reaches one of
them, so ``serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker starts: each process
writes its values to files there and ``/metrics`` merges them all (counters and histograms
summed; gauges summed over the live processes). Without it (the app in a test or another WSGI
server) the values stay in the process.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

from batching.engine import EngineObserver, RequestReport, StepReport
from djl_like.protocol import FinishReason

PREFIX = "lmi:"
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# vLLM's buckets (seconds), cut to what a CPU or GPU server produces.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_SUCCESS_REASONS = (FinishReason.LENGTH, FinishReason.EOS, FinishReason.STOP_SEQUENCE)


def is_multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROCESS_DIR_ENV))


class ServerMetrics:
    """Every metric of one worker, in its own registry (two apps in one process do not clash)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.engine = EngineMetrics(self.registry, model_name)
        self._http_requests = Counter(
            PREFIX + "http_requests", "HTTP responses by route and status (a stream counts its status "
            "line; how it ended is in request_success/aborted/failed).",
            ("model_name", "route", "method", "status"), registry=self.registry)

    def count_response(self, route: str, method: str, status: int) -> None:
        self._http_requests.labels(self.model_name, route, method, str(status)).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every metric (of every worker process under ``serve``)."""
        if is_multiprocess():
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class EngineMetrics(EngineObserver):
    """The engine's reports as Prometheus series (see the README for the list)."""

    def __init__(self, registry: CollectorRegistry, model_name: str):
        self._model_name = model_name
        self._totals: dict[str, int] = {}
        labels = ("model_name",)

        def gauge(name: str, documentation: str, extra: tuple[str, ...] = ()) -> Gauge:
            # NOTE: livesum: a dead worker's sequences and blocks are gone with it.
            return Gauge(PREFIX + name, documentation, labels + extra, registry=registry,
                         multiprocess_mode="livesum")

        def counter(name: str, documentation: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, documentation, labels + extra, registry=registry)

        def histogram(name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, documentation, labels, buckets=buckets, registry=registry)

        self.num_requests_running = gauge("num_requests_running", "Sequences in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_cache_blocks = gauge("kv_cache_blocks", "KV-cache blocks by state: used (held by a "
                                     "sequence), free (cached ones included), cached (free, holding a "
                                     "reusable prefix).", ("state",))
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Share of KV-cache blocks in use (0 to 1).")
        self.preemptions = counter("num_preemptions", "Sequences preempted for lack of KV blocks.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                      "cache (full blocks, once per admission).")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that got a first token.")
        self.generation_tokens = counter("generation_tokens", "Generated (sampled) tokens.")
        self.success = counter("request_success", "Requests finished by the model, by finish reason "
                               "(length, eos_token, stop_sequence).", ("finished_reason",))
        self.aborted = counter("request_aborted", "Requests aborted, by reason (client_disconnected, "
                               "timeout, cancelled, shutdown).", ("reason",))
        self.failed = counter("request_failed", "Requests failed, by error type (ModelError, OutOfMemory, "
                              "InternalServerError, ServiceUnavailable).", ("error_type",))
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", _TTFT_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds", "Mean time between a request's "
                              "tokens after the first.", _TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to the end, every finished request.",
                             _LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled.", _LATENCY_BUCKETS)

    def on_step(self, report: StepReport) -> None:
        name = self._model_name
        self.num_requests_running.labels(name).set(report.num_running)
        self.num_requests_waiting.labels(name).set(report.num_waiting)
        for state, count in (("used", report.num_blocks_used), ("free", report.num_blocks_free),
                             ("cached", report.num_blocks_cached)):
            self.kv_cache_blocks.labels(name, state).set(count)
        self.kv_cache_usage.labels(name).set(report.num_blocks_used / report.num_blocks if report.num_blocks else 0.0)
        self._add(self.preemptions, "preemptions", report.num_preemptions_total)
        self._add(self.generation_tokens, "generation_tokens", report.num_generation_tokens_total)
        self._add(self.prefix_queries, "prefix_queries", report.num_prefix_query_tokens_total)
        self._add(self.prefix_hits, "prefix_hits", report.num_prefix_hit_tokens_total)

    def _add(self, counter: Counter, key: str, total: int) -> None:
        """Counters move by the growth of the engine's running totals since the last report."""
        delta = total - self._totals.get(key, 0)
        self._totals[key] = total
        if delta > 0:
            counter.labels(self._model_name).inc(delta)

    def on_first_token(self, report: RequestReport) -> None:
        name = self._model_name
        self.prompt_tokens.labels(name).inc(report.num_prompt_tokens)
        if report.time_to_first_token_s is not None:
            self.ttft.labels(name).observe(report.time_to_first_token_s)
        if report.queue_s is not None:
            self.queue.labels(name).observe(report.queue_s)

    def on_request_finished(self, report: RequestReport) -> None:
        name = self._model_name
        if report.finish_reason in _SUCCESS_REASONS:
            self.success.labels(name, report.finish_reason.value).inc()
        elif report.finish_reason is FinishReason.ABORT:
            self.aborted.labels(name, report.cause or "unknown").inc()
        else:
            self.failed.labels(name, report.cause or "unknown").inc()
        if report.e2e_latency_s is not None:
            self.e2e.labels(name).observe(report.e2e_latency_s)
        if report.time_per_output_token_s is not None:
            self.tpot.labels(name).observe(report.time_per_output_token_s)

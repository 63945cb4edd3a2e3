"""In-process engine throughput (no HTTP): N sequences decoding M tokens each, per dtype.

    python -m benchmarks.engine_probe --dtypes fp32,bf16 --sequences 48 --new-tokens 32

Uses the embedded default model unless ``--model`` is given; one torch thread unless
``--threads``. Prints tokens/s per dtype and each dtype's greedy answer to a fixed prompt, so a
speed-up is never read without its output.
"""

from __future__ import annotations

import argparse
import time

import torch

from batching.offline import create_engine, generate
from djl_like.config import ServingConfig
from djl_like.protocol import GenerationParams

PROMPTS = ("The future of artificial intelligence is",
           "Write a short story about a robot who learns to paint. Once upon a time,")


def probe(model: str, dtype: str, sequences: int, new_tokens: int, strategy: str) -> tuple[float, str]:
    """Output tokens/s of one generate() over ``sequences`` prompts, and a sample answer."""
    config = ServingConfig(strategy=strategy, dtype=dtype, device="cpu", max_model_len=336,
                           max_kv_cache_tokens=336 * (sequences + 2), max_rolling_batch_size=sequences,
                           batch_size=sequences if strategy == "dynamic" else 1, max_batch_delay_ms=0)
    engine = create_engine(config, model)
    generate(engine, list(PROMPTS), GenerationParams(max_new_tokens=2, ignore_eos=True))  # warm-up
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(sequences)]
    start = time.perf_counter()
    generate(engine, prompts, GenerationParams(max_new_tokens=new_tokens, ignore_eos=True))
    tokens_per_s = sequences * new_tokens / (time.perf_counter() - start)
    sample = generate(engine, ["The capital of France is"], GenerationParams(max_new_tokens=8))[0].text
    return tokens_per_s, sample


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the embedded default model)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--sequences", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--strategy", default="paged", choices=("dynamic", "rolling", "paged"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model is None:
        from container.default_model import default_model_path

        args.model = default_model_path()
    for dtype in args.dtypes.split(","):
        tokens_per_s, sample = probe(args.model, dtype, args.sequences, args.new_tokens, args.strategy)
        print(f"{dtype}: {tokens_per_s:.0f} output tok/s ({args.sequences} x {args.new_tokens} tokens, "
              f"{args.strategy}, {args.threads} thread(s)); greedy sample: {sample!r}", flush=True)


if __name__ == "__main__":
    main()

"""In-process engine throughput (no HTTP): N sequences decoding M tokens each, per dtype.

    python -m benchmarks.engine_probe --dtypes fp32,bf16 --sequences 48 --new-tokens 32 [--quantize none,int8,int4]

Uses the embedded default model unless ``--model`` is given; one torch thread unless
``--threads``. Prints tokens/s per dtype and each dtype's greedy answer to a fixed prompt, so a
speed-up is never read without its output.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from batching import LLM

PROMPTS = ("The future of artificial intelligence is",
           "Write a short story about a robot who learns to paint. Once upon a time,")


def probe(model: str, dtype: str, sequences: int, new_tokens: int, strategy: str,
          tensor_parallel_degree: int = 1, quantize: str = "none") -> tuple[float, str]:
    """Output tokens/s of one generate() over ``sequences`` prompts, and a sample answer."""
    strategy_keys = {"dynamic": {"batch_size": sequences, "max_batch_delay": 0},
                     "rolling": {"rolling_batch": "auto", "paged_attention": False},
                     "paged": {"rolling_batch": "auto", "paged_attention": True}}[strategy]
    with LLM(model, dtype=dtype, quantize=quantize, device="cpu", max_model_len=336, max_kv_cache_tokens=336 * (sequences + 2),
             max_rolling_batch_size=sequences, tensor_parallel_degree=tensor_parallel_degree, **strategy_keys) as llm:
        llm.generate(list(PROMPTS), {"max_new_tokens": 2, "ignore_eos": True}, use_tqdm=False)  # warm-up
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(sequences)]
        start = time.perf_counter()
        llm.generate(prompts, {"max_new_tokens": new_tokens, "ignore_eos": True}, use_tqdm=False)
        tokens_per_s = sequences * new_tokens / (time.perf_counter() - start)
        sample = llm.generate("The capital of France is", {"max_new_tokens": 8}, use_tqdm=False)[0].text
    return tokens_per_s, sample


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the embedded default model)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--quantize", default="none",
                        help="comma-separated option.quantize values, each run with every dtype (none,int8,int4)")
    parser.add_argument("--sequences", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--strategy", default="paged", choices=("dynamic", "rolling", "paged"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (with --tensor-parallel-degree N, each rank takes cores // N)")
    parser.add_argument("--tensor-parallel-degree", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model is None:
        from container.default_model import default_model_path

        args.model = default_model_path()
    for quantize, dtype in itertools.product(args.quantize.split(","), args.dtypes.split(",")):
        tokens_per_s, sample = probe(args.model, dtype, args.sequences, args.new_tokens, args.strategy,
                                     args.tensor_parallel_degree, quantize)
        label = dtype if quantize == "none" else f"{dtype} + {quantize} weights"
        print(f"{label}: {tokens_per_s:.0f} output tok/s, {1000 * args.sequences / tokens_per_s:.1f} ms/step "
              f"({args.sequences} x {args.new_tokens} tokens, {args.strategy}, {args.threads} thread(s), "
              f"TP={args.tensor_parallel_degree}); greedy sample: {sample!r}", flush=True)


if __name__ == "__main__":
    main()

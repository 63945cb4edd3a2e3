"""GPU micro-benchmark: Triton paged decode attention vs gather + torch SDPA.

    python -m benchmarks.kernel_bench [--runs 100] [--warmup 20] [--batch-size 64]

Decode step of a Llama-8B-like layer (32 query heads, 8 KV heads, head_dim 128, block_size 16)
at contexts 512 and 2048, fp16 and bf16. The baseline is what the torch backend does per layer:
gather K/V through precomputed slots into a padded tensor, then ``F.scaled_dot_product_attention``
with ``enable_gqa`` (``kernels.reference.decode_from_slots``; the slots are built once per step,
outside the timing). Both are checked against ``kernels.reference.paged_decode_attention`` in fp32
first. Prints a markdown table of medians over ``--runs`` timed calls (CUDA events, after warmup).
CUDA only: not run in CI.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass

import torch

from kernels import reference

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
CONTEXT_LENS = (512, 2048)
DTYPES = (torch.float16, torch.bfloat16)
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


@dataclass
class DecodeCase:
    """One decode step's inputs on the GPU; caches [num_blocks, BLOCK_SIZE, Hkv, D]."""

    query: torch.Tensor  # [B, Hq, D]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32, physical blocks shuffled
    context_lens: torch.Tensor  # [B] int32
    slots: torch.Tensor  # [B, max_len] flattened cache slots, for the gather baseline
    valid: torch.Tensor  # [B, max_len] bool
    scale: float

    @property
    def kv_bytes(self) -> int:
        """K and V bytes a decode step must read at least."""
        tokens = int(self.context_lens.sum())
        return 2 * tokens * NUM_KV_HEADS * HEAD_DIM * self.k_cache.element_size()


def make_case(batch_size: int, context_len: int, dtype: torch.dtype) -> DecodeCase:
    generator = torch.Generator(device="cuda").manual_seed(context_len)
    blocks_per_seq = -(-context_len // BLOCK_SIZE)
    num_blocks = batch_size * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=generator, device="cuda", dtype=dtype)
    v_cache = torch.randn(shape, generator=generator, device="cuda", dtype=dtype)
    physical = torch.randperm(num_blocks, generator=generator, device="cuda")
    block_tables = physical.view(batch_size, blocks_per_seq).int()
    context_lens = torch.full((batch_size,), context_len, dtype=torch.int32, device="cuda")
    query = torch.randn(batch_size, NUM_HEADS, HEAD_DIM, generator=generator, device="cuda", dtype=dtype)
    positions = torch.arange(context_len, device="cuda").expand(batch_size, -1)
    slots = reference.context_slots(block_tables, positions, BLOCK_SIZE)
    valid = positions < context_lens[:, None]
    return DecodeCase(query, k_cache, v_cache, block_tables, context_lens, slots, valid, HEAD_DIM**-0.5)


def run_triton(case: DecodeCase) -> torch.Tensor:
    from kernels.triton_decode import paged_decode_attention

    return paged_decode_attention(case.query, case.k_cache, case.v_cache, case.block_tables,
                                  case.context_lens, case.scale)


def run_gather_sdpa(case: DecodeCase) -> torch.Tensor:
    return reference.decode_from_slots(case.query, case.k_cache, case.v_cache, case.slots, case.valid,
                                       reference.AttentionParams(case.scale))


def check(case: DecodeCase, name: str, out: torch.Tensor) -> float:
    """Max abs error vs the fp32 reference; raises AssertionError beyond the dtype's tolerance."""
    expected = reference.paged_decode_attention(case.query.float(), case.k_cache.float(), case.v_cache.float(),
                                                case.block_tables, case.context_lens, case.scale)
    tol = TOLERANCE[case.query.dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    return float((out.float() - expected).abs().max())


def median_ms(fn, case: DecodeCase, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn(case)
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(case)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_row(batch_size: int, context_len: int, dtype: torch.dtype, runs: int, warmup: int) -> str:
    from kernels.triton_decode import launch_config

    case = make_case(batch_size, context_len, dtype)
    error = check(case, "triton", run_triton(case))
    check(case, "gather+sdpa", run_gather_sdpa(case))
    triton_ms = median_ms(run_triton, case, runs, warmup)
    sdpa_ms = median_ms(run_gather_sdpa, case, runs, warmup)
    splits, _ = launch_config(batch_size, NUM_KV_HEADS, HEAD_DIM, case.block_tables.shape[1] * BLOCK_SIZE,
                              case.query.device)
    bandwidth = case.kv_bytes / (triton_ms * 1e-3) / 1e9
    dtype_name = str(dtype).removeprefix("torch.")
    return (f"| {dtype_name} | {batch_size} | {context_len} | {splits} | {triton_ms:.3f} | {sdpa_ms:.3f} "
            f"| {sdpa_ms / triton_ms:.2f}x | {bandwidth:.0f} | {error:.1e} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_bench needs a CUDA GPU (Triton kernels run only under the interpreter on CPU; "
              "see tests/kernels/test_triton_kernels.py for CPU correctness checks).", file=sys.stderr)
        return 1
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; Hq={NUM_HEADS}, Hkv={NUM_KV_HEADS}, "
          f"head_dim={HEAD_DIM}, block_size={BLOCK_SIZE}; median of {args.runs} runs\n")
    print("| dtype | batch | context | splits | triton ms | gather+SDPA ms | speedup | triton K/V GB/s | max err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in DTYPES:
        for context_len in CONTEXT_LENS:
            print(bench_row(args.batch_size, context_len, dtype, args.runs, args.warmup), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Weight streaming of one-row matrix products on this CPU, per weight format.

    python -m benchmarks.linear_probe --rows 1 --threads 1

Multiplies ``--rows`` activation rows by 60 distinct 576x1536 weight matrices (the default
model's MLP shape; 106 MB in bf16, more than any cache), each in turn, as a decode step reads a
model's layers. Prints ms per pass and the bf16-equivalent GB/s for bf16 and fp32 ``linear``, the same on
oneDNN-prepacked weights (``batching.packed_linear``), the project's AVX512-BF16 kernel (where built), torch's int8 and int4 weight-only kernels
(``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) and fbgemm's dynamic int8 linear.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

NUM_MATRICES, OUT_FEATURES, IN_FEATURES = 60, 1536, 576


def timed(function, repeats: int = 10) -> float:
    for _ in range(3):
        function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = [torch.randn(OUT_FEATURES, IN_FEATURES, dtype=torch.bfloat16) for _ in range(NUM_MATRICES)]
    x = torch.randn(args.rows, IN_FEATURES, dtype=torch.bfloat16)
    bf16_bytes = NUM_MATRICES * OUT_FEATURES * IN_FEATURES * 2
    fp32 = [w.float() for w in weights]
    scales = [w.float().abs().amax(1) / 127 for w in weights]
    int8 = [torch.round(w.float() / s[:, None]).clamp(-127, 127).to(torch.int8) for w, s in zip(weights, scales)]
    scales = [s.bfloat16() for s in scales]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        dynamic = []
        for w in fp32:
            layer = torch.nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False)
            layer.weight.data = w
            dynamic.append(torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(layer), {torch.nn.Linear},
                                                                  dtype=torch.qint8))
    xf = x.float()
    from batching.packed_linear import NativeBf16Linear, PackedLinear, native_bf16_kernel
    from batching.host_memory import HugePageArena
    from batching.quantize import Int4WeightOnlyLinear

    def layers(kind, tensors):
        out = []
        for w in tensors:
            linear = torch.nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False, dtype=w.dtype)
            linear.weight.data = w
            out.append(kind(linear))
        return out

    packed_bf16, packed_fp32 = layers(PackedLinear, weights), layers(PackedLinear, fp32)
    int4 = layers(Int4WeightOnlyLinear, weights)
    kernel = native_bf16_kernel()
    arena = HugePageArena()  # as the model runner places them
    native = layers(lambda linear: NativeBf16Linear(linear, kernel, arena), weights) if kernel is not None else []
    cases = {
        "bf16 linear": lambda: [torch.nn.functional.linear(x, w) for w in weights],
        "bf16 prepacked (batching.packed_linear)": lambda: [layer(x) for layer in packed_bf16],
        **({"bf16 native kernel (kernels/csrc/cpu_linear.cpp)": lambda: [layer(x) for layer in native]}
           if native else {}),
        "fp32 linear": lambda: [torch.nn.functional.linear(xf, w) for w in fp32],
        "fp32 prepacked": lambda: [layer(xf) for layer in packed_fp32],
        "int4 weight-only (_weight_int4pack_mm_for_cpu, groups of 32)": lambda: [layer(x) for layer in int4],
        "int8 weight-only (_weight_int8pack_mm)": lambda: [torch._weight_int8pack_mm(x, q, s) for q, s in zip(int8, scales)],
        "fbgemm dynamic int8": lambda: [m(xf) for m in dynamic],
    }
    with torch.inference_mode():
        for name, function in cases.items():
            seconds = timed(function)
            print(f"{name}: {seconds * 1000:.2f} ms, {bf16_bytes / seconds / 1e9:.1f} GB/s bf16-equivalent "
                  f"({args.rows} row(s), {args.threads} thread(s))", flush=True)


if __name__ == "__main__":
    main()

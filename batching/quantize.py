"""Weight-only quantization of a loaded model's linear layers (``option.quantize``).

Small batches on a CPU are bound by the bytes of weights each step reads, so fewer bytes per
weight is the lever for latency at low concurrency. Two schemes, both computed by torch's own CPU
kernels (activations stay in the model's dtype; only the weights shrink):

- ``int8``: one signed byte per weight, symmetric, one scale per output channel;
  ``torch._weight_int8pack_mm``. A quarter of fp32's bytes, half of bf16's.
- ``int4``: four bits per weight, asymmetric (a scale and a zero point) per group of
  ``INT4_GROUP_SIZE`` input features; ``torch.ops.aten._weight_int4pack_mm_for_cpu``.

Every ``nn.Linear`` whose shape the kernel takes is replaced, the LM head included (a tied
embedding keeps its full-precision matrix for the lookup, which reads one row per token). Other
layers (GPT-2's ``Conv1D``, fused MoE expert tensors) stay in the model's dtype and the report
says how many bytes that leaves.

Both kernels compute each activation row on its own, so a request's output does not depend on
which requests share its step. Their cost grows with the number of rows: on the machine of
docs/benchmarks.md int8 is 2.1x faster than bf16 at one row and slower from about 12 rows on.

NOTE: the replaced modules have no ``weight`` attribute on purpose: model code that reads a
linear layer's weight directly would bypass the quantized kernel, so it fails at load (and the
engine refuses the model) instead of computing something else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from djl_like.errors import ConfigError

logger = logging.getLogger(__name__)

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZE = 32


class Int8WeightOnlyLinear(nn.Module):
    """``nn.Linear`` with int8 weights [out, in] and one scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.bias = linear.bias

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == self.scales.dtype:  # the engine's own forward: no reshapes or casts
            y = torch._weight_int8pack_mm(x, self.qweight, self.scales)
            return y if self.bias is None else y + self.bias
        rows = x.reshape(-1, self.in_features)
        y = torch._weight_int8pack_mm(rows.to(self.scales.dtype), self.qweight, self.scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class Int4WeightOnlyLinear(nn.Module):
    """``nn.Linear`` with 4-bit weights in groups of ``group_size`` input features, each group
    with a scale and a zero point: ``w = (q - 8) * scale + zero`` for q in 0..15."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        groups = weight.view(out_features, in_features // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scales = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.view(out_features, in_features), 1))
        # [in / group, out, 2]: (scale, zero) with zero the value q = 8 stands for.
        self.register_buffer("scales_and_zeros", torch.stack(
            [scales.t(), (low + 8 * scales).t()], dim=-1).contiguous().to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == self.scales_and_zeros.dtype:  # the engine's own forward
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)
            return y if self.bias is None else y + self.bias
        rows = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size,
                                                        self.scales_and_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


@dataclass(frozen=True)
class QuantizeReport:
    scheme: str
    layers_quantized: int
    layers_kept: int  # linear layers the kernel cannot take (shape), left in the model's dtype
    bytes_before: int  # weight bytes a decode step reads, before and after (see weight_bytes)
    bytes_after: int


def check_scheme(scheme: str | None, device: torch.device, tensor_parallel_degree: int) -> None:
    """Refuse, before loading anything, what ``option.quantize`` cannot do here."""
    if scheme is None:
        return
    if scheme not in SCHEMES:
        raise ConfigError(f"option.quantize={scheme!r} is not supported; choose one of: {', '.join(SCHEMES)} "
                          "(weight-only, CPU)")
    if device.type != "cpu":
        raise ConfigError(f"option.quantize={scheme} uses torch's CPU kernels and is not supported on "
                          f"{device.type} yet; leave option.quantize unset there")
    if tensor_parallel_degree > 1:
        raise ConfigError(f"option.quantize={scheme} is not supported with option.tensor_parallel_degree > 1 yet")


def _quantizable(linear: nn.Linear, scheme: str) -> bool:
    if scheme == "int4":
        in_features, out_features = linear.in_features, linear.out_features
        return in_features % INT4_GROUP_SIZE == 0 and out_features % 16 == 0  # the packing kernel's rule
    return True


def decode_weight_bytes(model: nn.Module) -> dict[str, int | bool]:
    """Bytes of weights one decode step (one token) reads, and the facts behind the figure.

    Parameters and buffers (quantized weights are buffers), each tensor once: a tied matrix is
    listed once and the LM head reads it whole. An ``nn.Embedding`` whose weight is not the LM
    head's (an untied input embedding, GPT-2's position table, or a table whose head was
    quantized into its own copy) is looked up: one row per token."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_weight = getattr(output, "weight", None)
    input_embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    input_weight = getattr(input_embeddings, "weight", None)
    lookups = {id(module.weight) for module in model.modules()
               if isinstance(module, nn.Embedding) and module.weight is not output_weight}
    # Persistent buffers are weights too (quantized ones); non-persistent ones (RoPE's inverse
    # frequencies) are derived, and small.
    weights = [buffer for module in model.modules() for name, buffer in module.named_buffers(recurse=False)
               if name not in module._non_persistent_buffers_set]
    read = total = num_parameters = 0
    seen: set[int] = set()
    for tensor in [*model.parameters(), *weights]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = tensor.numel() * tensor.dtype.itemsize  # (oneDNN's packed weights have no storage to ask)
        total += size
        num_parameters += tensor.numel()
        read += tensor[0].numel() * tensor.dtype.itemsize if id(tensor) in lookups else size
    return {"weight_bytes": read, "parameter_bytes": total, "num_parameters": num_parameters,  # weights stored
            "tied_embeddings": input_weight is not None and input_weight is output_weight}


def weight_bytes(model: nn.Module) -> int:
    return decode_weight_bytes(model)["weight_bytes"]


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str) -> QuantizeReport:
    """Replace every quantizable ``nn.Linear`` of ``model`` in place."""
    before = weight_bytes(model)
    quantized = kept = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if not _quantizable(child, scheme):
                kept += 1
                continue
            layer = Int8WeightOnlyLinear(child) if scheme == "int8" else Int4WeightOnlyLinear(child)
            setattr(parent, name, layer)
            quantized += 1
    report = QuantizeReport(scheme, quantized, kept, before, weight_bytes(model))
    logger.info("option.quantize=%s: %d linear layers quantized, %d kept; weights read per step %.1f -> %.1f MB",
                scheme, quantized, kept, before / 1e6, report.bytes_after / 1e6)
    if quantized == 0:
        raise ConfigError(f"option.quantize={scheme}: the model has no nn.Linear layer this scheme can quantize "
                          f"({type(model).__name__}); leave option.quantize unset")
    return report

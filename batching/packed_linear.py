"""CPU linear layers on weights prepacked once, at load, into oneDNN's blocked layout.

``torch.nn.functional.linear`` hands oneDNN a plain row-major weight on every call; oneDNN then
streams it in a layout that suits large batches. Reordered once into the layout oneDNN picks for
the matrix (``torch.ops.mkldnn._reorder_linear_weight``, what torch's inductor uses when it
freezes a CPU model), the same products run about twice as fast at the small batches decoding
has (``python -m benchmarks.linear_probe``; figures in docs/benchmarks.md).

bf16 results are bitwise those of ``linear``; fp32 ones differ in the last bits (another
summation order), as any two BLAS kernels do. Each row is computed on its own, so a request's
output does not depend on which requests share its step.

Applied by the model runner to every plain ``nn.Linear`` of a model served on CPU in bf16 or
fp32 (not under tensor parallelism, whose sharding hooks sit on the linear layers; fp16 only on
CPUs with AVX512-FP16 or AVX-NE-CONVERT, where oneDNN takes it). A layer the reorder refuses
keeps torch's ``linear``. Memory: each packed weight replaces its linear layer's, except a LM head
tied to the input embedding, which gets its own packed copy (the table stays for the lookups):
the embedding table's size more (56 MB in bf16 for the default model).

bf16 layers on CPUs with AVX512-BF16 use the project's own kernel instead
(``kernels/csrc/cpu_linear.cpp``, :class:`NativeBf16Linear`) where it is built: a layout that
streams each weight once and overlaps the next weights' loads with the current products, faster
than oneDNN's at every batch a decode step has (``python -m benchmarks.linear_probe``; figures in
docs/benchmarks.md). Its results may differ from ``linear``'s in the last bit (fp32 summation
order); each row is still computed on its own. ``LMI_CPU_KERNELS=torch`` keeps oneDNN. Its packed
weights live in huge pages where the kernel gives them (``host_memory.HugePageArena``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from batching.host_memory import HugePageArena

logger = logging.getLogger(__name__)


def available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def agrees_with_linear(layer: nn.Module, linear: nn.Linear) -> bool:
    """The packed layer's product against torch's ``linear`` on a random input (relative
    tolerance of the dtype): checked once per dtype before a model is packed, so a kernel that
    computes something else on some CPU is never served."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, linear.in_features, generator=generator).to(linear.weight.dtype)
    expected = nn.functional.linear(x.float(), linear.weight.float(),
                                    None if linear.bias is None else linear.bias.float())
    got = layer(x).float()
    tolerance = 1e-4 if linear.weight.dtype == torch.float32 else 2e-2
    return bool(((got - expected).abs().max() <= tolerance * expected.abs().max().clamp(min=1e-6)).item())


class PackedLinear(nn.Module):
    """``nn.Linear`` whose weight lives in oneDNN's blocked layout (an opaque tensor).

    NOTE: no ``weight`` attribute on purpose: model code that reads a linear layer's weight
    directly would get a tensor it cannot use, so it fails at load instead of computing
    something else."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class NativeBf16Linear(nn.Module):
    """``nn.Linear`` in bf16 on the project's AVX512-BF16 kernel, its weight packed once into the
    kernel's tile layout (no ``weight`` attribute, as for :class:`PackedLinear`)."""

    def __init__(self, linear: nn.Linear, native, arena: HugePageArena | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.native = native
        numel = native.bf16_linear_packed_numel(self.out_features, self.in_features)
        packed = arena.empty(numel, torch.bfloat16) if arena is not None else torch.empty(numel, dtype=torch.bfloat16)
        native.bf16_linear_pack(linear.weight.detach(), packed)
        self.register_buffer("packed", packed)
        self.bias = linear.bias
        self.register_buffer("bias_fp32", None if linear.bias is None else linear.bias.detach().float().contiguous(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:  # NOTE: the kernel takes bf16 only; models hand it their dtype
            raise TypeError(f"NativeBf16Linear got a {x.dtype} input; its weight is bf16")
        return self.native.bf16_linear(x, self.packed, self.out_features, self.bias_fp32)


def native_bf16_kernel():
    """The compiled kernels' module when they carry the AVX512-BF16 linear layers, else None."""
    from kernels import cpu_native

    native = cpu_native.load()
    return native if native is not None and native.avx512_bf16() else None


def pack_model(model: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` in place; returns how many were packed."""
    if not available():
        logger.info("oneDNN is not available in this torch build: linear layers use torch's linear")
        return 0
    native = native_bf16_kernel() if any(
        type(module) is nn.Linear and module.weight.dtype == torch.bfloat16 for module in model.modules()) else None
    packed = refused = 0
    arena = HugePageArena()  # the kernel's packed weights, in huge pages; dropped with the layers
    kinds: dict[str, int] = {}
    checked: dict[tuple[type, torch.dtype], bool] = {}  # (kind, dtype) -> its product agrees with linear's
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                layer = _packed_layer(child, native, arena, checked, first_refusal=not refused)
                if layer is None:
                    refused += 1
                    continue
                setattr(parent, name, layer)
                packed += 1
                kinds[type(layer).__name__] = kinds.get(type(layer).__name__, 0) + 1
    logger.info("prepacked %d linear layers (%s; %d left to torch's linear)", packed,
                ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) or "none", refused)
    return packed


def _packed_layer(linear: nn.Linear, native, arena: HugePageArena, checked: dict,
                  first_refusal: bool) -> nn.Module | None:
    """The first kind that takes ``linear`` and whose product agrees with torch's ``linear``
    (checked once per kind and dtype): the project's bf16 kernel, then oneDNN; None for neither."""
    dtype = linear.weight.dtype
    candidates = []
    if native is not None and dtype == torch.bfloat16 and linear.in_features % 2 == 0:
        candidates.append((NativeBf16Linear, lambda: NativeBf16Linear(linear, native, arena)))
    candidates.append((PackedLinear, lambda: PackedLinear(linear)))
    for kind, make in candidates:
        if checked.get((kind, dtype)) is False:
            continue
        try:
            layer = make()
        except RuntimeError as error:  # e.g. oneDNN and fp16 on a CPU without AVX512-FP16
            if first_refusal:
                logger.info("%s does not take %s weights here (%s); those layers use torch's linear",
                            kind.__name__, dtype, str(error).splitlines()[0])
            continue
        if (kind, dtype) not in checked:
            checked[kind, dtype] = agrees_with_linear(layer, linear)
            if not checked[kind, dtype]:
                logger.warning("%s's %s product disagrees with torch's linear on this CPU; it serves no layers",
                               kind.__name__, dtype)
                continue
        return layer
    return None

"""The engine's own forward pass for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3, Phi-3).

transformers' forward is written for every use of a model: each decoder layer goes through
module calls, keyword plumbing, output-capturing decorators, separate q/k/v and gate/up
projections and a rotary helper per tensor. At one sequence per step that Python work costs as
much as the weights' own reads (docs/benchmarks.md, "Own forward"). For the architectures below
the engine runs the same computation itself:

- **Fused projections** (``fuse_projections``; Phi-3's checkpoints come fused): q, k and v become
  one linear layer of the concatenated weights, gate and up another, so a layer makes four matrix products instead of
  seven. The model's own ``q_proj`` ... ``up_proj`` become ``FusedSlice`` views of those layers,
  so transformers' forward still runs (the load-time check compares against it) and no weight
  is stored twice. Quantization and prepacking then apply to the fused layers like to any other.
- **A lean forward** (``LeanForward``): embedding, the model's own rotary module once per step,
  then per layer RMSNorm, the fused QKV product, rotary embedding on q and k together, the
  engine's attention, the output projection, RMSNorm, the fused gate/up product, SiLU, down
  projection; the final norm and the LM head on the sampled rows only. Every elementwise step
  runs in the same dtype and order as transformers' code, so results are those of the model.

Which models: exactly the transformers classes named in ``FAMILIES``, with exactly the
submodules those classes build (an extra or missing module, a forward hook, another activation,
or remote code with the same class name keeps transformers' forward). The load-time check
(``batching.model_check.verify``) then compares this forward, through the paged KV cache, with
the model's eager forward; if it disagrees, the runner serves through transformers' forward and
says so. Only on CPU and without tensor parallelism (whose sharding hooks sit on the projections).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels import attention
from kernels.attention import AttentionMetadata, LayerSpec
from kernels.reference import AttentionParams

logger = logging.getLogger(__name__)

QKV, GATE_UP = "lmi_qkv_proj", "lmi_gate_up_proj"


@dataclass(frozen=True)
class Family:
    """What a family's modules look like beyond Llama's."""

    qk_norm: bool = False  # q and k normalized per head before the rotary embedding (Qwen3)
    fused: bool = False  # the checkpoint already fuses q/k/v and gate/up (Phi-3's qkv_proj, gate_up_proj)
    dropouts: tuple[str, ...] = ()  # decoder-layer dropouts (identity in eval mode)

    @property
    def attention_children(self) -> set[str]:
        if self.fused:
            return {"qkv_proj", "o_proj"}
        return {"q_proj", "k_proj", "v_proj", "o_proj"} | ({"q_norm", "k_norm"} if self.qk_norm else set())

    @property
    def mlp_children(self) -> set[str]:
        return {"gate_up_proj", "down_proj", "activation_fn"} if self.fused else {"gate_proj", "up_proj", "down_proj", "act_fn"}

    @property
    def names(self) -> tuple[str, str, str]:
        """The fused q/k/v layer, the fused gate/up layer and the activation, by attribute name."""
        return ("qkv_proj", "gate_up_proj", "activation_fn") if self.fused else (QKV, GATE_UP, "act_fn")


# transformers class-name prefix of each family.
FAMILIES = {"Llama": Family(), "Mistral": Family(), "Qwen2": Family(), "Qwen3": Family(qk_norm=True),
            "Phi3": Family(fused=True, dropouts=("resid_attn_dropout", "resid_mlp_dropout"))}


class FusedSlice(nn.Module):
    """One projection of a fused layer (q, k or v of ``QKV``; gate or up of ``GATE_UP``): columns
    ``[start, end)`` of its output. The fused layer is looked up on ``owner`` at every call, so
    quantization or prepacking that replaces it is seen. Sibling slices called with the same input
    tensor share one product (a one-entry cache on the owner, dropped once every slice has read it)."""

    def __init__(self, owner: nn.Module, fused_name: str, start: int, end: int, siblings: int):
        super().__init__()
        self.__dict__["_owner"] = weakref.ref(owner)  # NOTE: not a submodule (no cycle, not walked twice)
        self.fused_name, self.start, self.end, self.siblings = fused_name, start, end, siblings
        self.in_features, self.out_features = getattr(owner, fused_name).in_features, end - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self._owner()
        cache_name = f"_{self.fused_name}_cache"
        cache = owner.__dict__.get(cache_name)
        if cache is None or cache[0] is not x or self.start in cache[2]:
            cache = (x, getattr(owner, self.fused_name)(x), set())
            owner.__dict__[cache_name] = cache
        cache[2].add(self.start)
        out = cache[1][..., self.start:self.end].contiguous()
        if len(cache[2]) == self.siblings:
            owner.__dict__.pop(cache_name, None)
        return out

    def extra_repr(self) -> str:
        return f"{self.fused_name}[{self.start}:{self.end}]"


def _fuse(owner: nn.Module, names: tuple[str, ...], fused_name: str) -> None:
    layers = [getattr(owner, name) for name in names]
    with torch.no_grad():
        weight = torch.cat([layer.weight for layer in layers])
        bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    fused = nn.Linear(layers[0].in_features, weight.shape[0], bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    setattr(owner, fused_name, fused)
    start = 0
    for name, layer in zip(names, layers):
        setattr(owner, name, FusedSlice(owner, fused_name, start, start + layer.out_features, len(names)))
        start += layer.out_features


def _children(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_children()}


def lean_family(model: nn.Module) -> tuple[str | None, str]:
    """(family prefix, "") when the model is exactly one of ``FAMILIES``' transformers classes
    with exactly their submodules, else (None, the reason)."""
    name = type(model).__name__
    prefix = name.removesuffix("ForCausalLM")
    if prefix == name or prefix not in FAMILIES:
        return None, f"{name} is not one of the lean architectures ({', '.join(FAMILIES)})"
    if not type(model).__module__.startswith("transformers.models."):
        return None, f"{name} comes from {type(model).__module__}, not from transformers"
    if any(module._forward_hooks or module._forward_pre_hooks for module in model.modules()):
        return None, "the model has forward hooks"
    config = model.config
    if getattr(config, "hidden_act", None) not in ("silu", "swish"):
        return None, f"hidden_act={getattr(config, 'hidden_act', None)!r}"
    family = FAMILIES[prefix]
    if model.training:
        return None, "the model is in training mode"
    inner = getattr(model, "model", None)
    expected = [(model, "ForCausalLM", {"model", "lm_head"}),
                (inner, "Model", {"embed_tokens", "layers", "norm", "rotary_emb"})]
    for layer in getattr(inner, "layers", []):
        expected += [(layer, "DecoderLayer",
                      {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm", *family.dropouts}),
                     (layer.self_attn, "Attention", family.attention_children),
                     (layer.mlp, "MLP", family.mlp_children)]
    for module, suffix, children in expected:
        if type(module).__name__ != prefix + suffix or _children(module) != children:
            return None, f"{type(module).__name__} has submodules {sorted(_children(module))}, not {sorted(children)}"
    norms = [inner.norm] + [norm for layer in inner.layers for norm in
                            (layer.input_layernorm, layer.post_attention_layernorm,
                             *((layer.self_attn.q_norm, layer.self_attn.k_norm) if family.qk_norm else ()))]
    if any(type(norm).__name__ != prefix + "RMSNorm" for norm in norms):
        return None, "a norm is not the family's RMSNorm"
    for layer in inner.layers:
        if any(type(getattr(layer, name)) is not nn.Dropout for name in family.dropouts):
            return None, "a decoder-layer dropout is not nn.Dropout"
        names = (["qkv_proj", "o_proj"] if family.fused else ["q_proj", "k_proj", "v_proj", "o_proj"])
        projections = [getattr(layer.self_attn, n) for n in names]
        mlp_names = ["gate_up_proj", "down_proj"] if family.fused else ["gate_proj", "up_proj", "down_proj"]
        projections += [getattr(layer.mlp, n) for n in mlp_names]
        if any(type(p) is not nn.Linear for p in projections):
            return None, "a projection is not a plain nn.Linear"
        activation = getattr(layer.mlp, family.names[2])
        if type(activation).__name__ not in ("SiLUActivation", "SiLU"):
            return None, f"the MLP activation is {type(activation).__name__}"
        groups = [] if family.fused else [projections[0:3], projections[4:6]]
        for group in groups:
            if len({(p.bias is None, p.weight.dtype) for p in group}) != 1:
                return None, "projections of one group differ in bias or dtype"
    if type(inner.embed_tokens) is not nn.Embedding:
        return None, f"the input embedding is {type(inner.embed_tokens).__name__}"
    return prefix, ""


def fuse_projections(model: nn.Module) -> str | None:
    """Fuse q/k/v and gate/up of every layer of a lean-family model in place (before quantizing or
    prepacking, which then apply to the fused layers); returns the family, or None (with the
    reason logged) for any other model, left untouched."""
    family, reason = lean_family(model)
    if family is None:
        logger.info("transformers' forward serves this model (%s)", reason)
        return None
    if not FAMILIES[family].fused:
        for layer in model.model.layers:
            _fuse(layer.self_attn, ("q_proj", "k_proj", "v_proj"), QKV)
            _fuse(layer.mlp, ("gate_proj", "up_proj"), GATE_UP)
    return family


@dataclass(frozen=True)
class _Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: nn.Module
    o_proj: nn.Module
    gate_up: nn.Module
    down: nn.Module
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    params: AttentionParams
    layer_idx: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama-family RMSNorm, operation for operation (fp32 statistics, the product
    with the weight in the input's dtype)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers applies it: ``x * cos + rotate_half(x) * sin`` on the first
    ``cos.shape[-1]`` features of each head (all of them but for a partial rotary factor), the
    rest passed through."""
    width = cos.shape[-1]
    if width < x.shape[-1]:
        return torch.cat([rotate(x[..., :width], cos, sin), x[..., width:]], dim=-1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class TorchSteps:
    """The elementwise steps of a layer in torch's operators, with the signatures of the compiled
    ones (kernels/csrc/cpu_layer_ops.cpp), which they stand in for where those do not build."""

    @staticmethod
    def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if delta is not None:
            x.add_(delta)  # the residual stream, rounded once as in ``residual + hidden_states``
        return rms_norm(x, weight, eps)

    @staticmethod
    def rope_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> None:
        qkv[:, :heads] = rotate(qkv[:, :heads], cos[:, None], sin[:, None])

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        half = gate_up.shape[-1] // 2
        return F.silu(gate_up[:, :half]) * gate_up[:, half:]


class LeanForward:
    """The lean forward of one fused model (``fuse_projections``), bound to the attention
    parameters the discovery forward saw in each layer (``batching.model_check.discover_layers``)."""

    def __init__(self, model: nn.Module, family: str, specs: list[LayerSpec], native=None):
        """``native``: the compiled CPU kernels (kernels/cpu_native.py) for the fused elementwise
        steps (residual add + RMSNorm, rotary embedding in place, SiLU product), or None for
        torch's operators."""
        self.native = native
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.final_norm = inner.norm
        self.lm_head = model.lm_head
        norms = [inner.norm] + [norm for layer in inner.layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
        eps = {norm.variance_epsilon for norm in norms}
        if len(eps) != 1:
            raise ValueError(f"the norms use different epsilons {sorted(eps)}")
        self.eps = eps.pop()
        dtype = self.embed.weight.dtype
        if any(norm.weight.dtype != dtype for norm in norms):
            raise ValueError(f"norm weights are not all in the model's dtype {dtype}")
        self.layers: list[_Layer] = []
        qkv_name, gate_up_name, _ = FAMILIES[family].names
        qk_norm = FAMILIES[family].qk_norm
        for layer, spec in zip(inner.layers, specs, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            if spec.softcap is not None or spec.has_sinks or spec.layer_idx != attn.layer_idx:
                raise ValueError(f"layer {spec.layer_idx} asks for softcapping or sinks, or is out of order")
            qkv_width = getattr(attn, qkv_name).out_features
            head_dim = spec.head_dim
            num_heads = qkv_width // head_dim - 2 * spec.num_kv_heads
            self.layers.append(_Layer(
                layer.input_layernorm.weight, layer.post_attention_layernorm.weight, getattr(attn, qkv_name),
                attn.o_proj, getattr(mlp, gate_up_name), mlp.down_proj,
                attn.q_norm.weight if qk_norm else None, attn.k_norm.weight if qk_norm else None,
                AttentionParams(float(attn.scaling), spec.sliding_window), spec.layer_idx, num_heads,
                spec.num_kv_heads, head_dim))
        self.qk_norm_eps = inner.layers[0].self_attn.q_norm.variance_epsilon if qk_norm else None

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_indices: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, position_ids [1, T] -> logits [len(logits_indices), vocab] in the model's dtype."""
        embedded = self.embed.forward(input_ids)  # [1, T, hidden]
        cos, sin = self.rotary(embedded, position_ids)
        cos, sin = cos[0], sin[0]  # [T, rotary width]
        # The residual stream: a fresh tensor, updated in place by the steps' residual adds.
        x = embedded[0]
        steps, eps, num_tokens = self.native or TorchSteps, self.eps, x.shape[0]
        h = steps.add_rms_norm(x, None, self.layers[0].input_norm, eps)
        for i, layer in enumerate(self.layers):
            heads, kv_heads = layer.num_heads, layer.num_kv_heads
            qkv = layer.qkv.forward(h).view(num_tokens, heads + 2 * kv_heads, layer.head_dim)
            if layer.q_norm is None:
                steps.rope_(qkv, cos, sin, heads + kv_heads)
                q, k = qkv[:, :heads], qkv[:, heads:heads + kv_heads]
            else:
                q = rotate(rms_norm(qkv[:, :heads], layer.q_norm, self.qk_norm_eps), cos[:, None], sin[:, None])
                k = rotate(rms_norm(qkv[:, heads:heads + kv_heads], layer.k_norm, self.qk_norm_eps),
                           cos[:, None], sin[:, None])
            out = attention.attend(meta, layer.layer_idx, q, k, qkv[:, heads + kv_heads:], layer.params)
            h = steps.add_rms_norm(x, layer.o_proj.forward(out.reshape(num_tokens, heads * layer.head_dim)),
                                   layer.post_norm, eps)
            mlp = layer.down.forward(steps.silu_mul(layer.gate_up.forward(h)))
            if i + 1 < len(self.layers):
                h = steps.add_rms_norm(x, mlp, self.layers[i + 1].input_norm, eps)
            else:
                x.add_(mlp)
        # The final norm is per row: only the rows that sample need it.
        return self.lm_head(steps.add_rms_norm(x[logits_indices], None, self.final_norm.weight, eps))

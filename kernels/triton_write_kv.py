"""Triton kernel writing new keys/values into their cache slots, and its launcher.

Same contract as ``kernels.reference.write_kv``. The checks shared by every kernel over the
paged KV cache (cache pair, supported dtypes, devices) live here too and are reused by
``kernels.triton_decode``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

# NOTE: ~4K elements per tensor per program keeps a program's registers modest at head_dim 128
# (32 heads) while letting small heads share one program.
_ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr,  # [T, Hkv, D]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    slot_mapping_ptr,  # [T], -1 = padding token, not written
    num_kv_heads, head_dim, block_size,
    stride_key_token, stride_key_head, stride_value_token, stride_value_head,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    HEADS_PER_PROGRAM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    # grid: (T, cdiv(Hkv, HEADS_PER_PROGRAM)); one program copies one token's block of heads.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        heads = tl.program_id(1) * HEADS_PER_PROGRAM + tl.arange(0, HEADS_PER_PROGRAM)
        dims = tl.arange(0, HEAD_DIM_PAD)
        mask = (heads < num_kv_heads)[:, None] & (dims < head_dim)[None, :]
        # int64 from here on: block * stride exceeds 2^31 for large caches.
        block = slot // block_size
        in_block = slot % block_size
        heads64 = heads.to(tl.int64)[:, None]
        key = tl.load(key_ptr + token * stride_key_token + heads64 * stride_key_head + dims[None, :], mask=mask)
        value = tl.load(value_ptr + token * stride_value_token + heads64 * stride_value_head + dims[None, :],
                        mask=mask)
        k_dest = k_cache_ptr + block * stride_kc_block + in_block * stride_kc_slot + heads64 * stride_kc_head
        v_dest = v_cache_ptr + block * stride_vc_block + in_block * stride_vc_slot + heads64 * stride_vc_head
        tl.store(k_dest + dims[None, :], key.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dest + dims[None, :], value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [T, Hkv, D] into k_cache/v_cache [num_blocks, block_size, Hkv, D] at the
    flattened slots ``slot_mapping`` [T] (int32/int64; -1 = skip). Casts to the cache dtype.
    Raises ValueError on mismatched shapes, dtypes, strides or devices."""
    _check_write_kv_args(key, value, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    head_dim_pad = triton.next_power_of_2(head_dim)
    heads_per_program = min(triton.next_power_of_2(num_kv_heads), max(1, _ELEMENTS_PER_PROGRAM // head_dim_pad))
    grid = (num_tokens, triton.cdiv(num_kv_heads, heads_per_program))
    _write_kv_kernel[grid](
        key, value, k_cache, v_cache, slot_mapping,
        num_kv_heads, head_dim, k_cache.shape[1],
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEADS_PER_PROGRAM=heads_per_program,
        HEAD_DIM_PAD=head_dim_pad,
    )


def _check_write_kv_args(key, value, k_cache, v_cache, slot_mapping) -> None:
    check_kv_cache_pair(k_cache, v_cache)
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key and value must both be [T, Hkv, D]; got key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}")
    if tuple(key.shape[1:]) != tuple(k_cache.shape[2:]):
        raise ValueError(f"key/value heads and head_dim {tuple(key.shape[1:])} do not match the cache's "
                         f"{tuple(k_cache.shape[2:])} (cache is [num_blocks, block_size, Hkv, D])")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping must be [T] = [{key.shape[0]}]; got {tuple(slot_mapping.shape)}")
    check_dtype("key", key, FLOAT_DTYPES)
    check_dtype("value", value, FLOAT_DTYPES)
    check_dtype("slot_mapping", slot_mapping, INDEX_DTYPES)
    check_last_dim_contiguous(key=key, value=value)
    check_same_device(_write_kv_kernel, key=key, value=value, k_cache=k_cache, v_cache=v_cache,
                      slot_mapping=slot_mapping)


def check_kv_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Both caches [num_blocks, block_size, Hkv, D], same shape and a supported float dtype."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache must both be [num_blocks, block_size, Hkv, D]; got "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    check_dtype("k_cache", k_cache, FLOAT_DTYPES)
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share a dtype; got {k_cache.dtype} and {v_cache.dtype}")
    check_last_dim_contiguous(k_cache=k_cache, v_cache=v_cache)


def check_dtype(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in allowed:
        names = ", ".join(str(dtype).removeprefix("torch.") for dtype in allowed)
        raise ValueError(f"{name} dtype {str(tensor.dtype).removeprefix('torch.')} is not supported "
                         f"(expected one of {names})")


def check_last_dim_contiguous(**tensors: torch.Tensor) -> None:
    """Kernels address the last dim as ``base + arange``: it must have stride 1."""
    for name, tensor in tensors.items():
        if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride {tensor.stride(-1)}); "
                             "call .contiguous() first")


def check_same_device(kernel, **tensors: torch.Tensor) -> None:
    """All tensors on one device, and one ``kernel`` can run on: CUDA, or CPU when it was decorated
    under TRITON_INTERPRET=1 (``@triton.jit`` reads the flag when the kernel module is imported)."""
    devices = {name: tensor.device for name, tensor in tensors.items()}
    if len(set(devices.values())) != 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")
    device = next(iter(devices.values()))
    compiled = isinstance(kernel, triton.runtime.JITFunction)
    if device.type == "cpu" and compiled:
        raise ValueError("Triton kernels need CUDA tensors; CPU tensors run only under the Triton "
                         "interpreter (TRITON_INTERPRET=1 set before kernels.triton_* is imported). "
                         "Use kernels.reference on CPU.")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device} (expected cuda)")

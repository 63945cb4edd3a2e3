"""The compiled CPU decode kernel (kernels/csrc/cpu_attention.cpp) against the torch reference
(kernels/reference.py), and how the CPU backend is chosen. The engine-level proof (every
architecture's greedy output equals ``generate``, windows, softcapping and sinks included) is the
compatibility matrix, which runs on this backend wherever it builds."""

from __future__ import annotations

import pytest
import torch

from djl_like.errors import ConfigError
from kernels import attention, cpu_native, reference

native = cpu_native.load()
needs_native = pytest.mark.skipif(native is None, reason="no C++ compiler here: the torch path serves")


def _cache_and_tables(lengths, block_size, num_kv_heads, head_dim, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    blocks = [-(-length // block_size) for length in lengths]
    num_blocks = sum(blocks) + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    order = torch.randperm(num_blocks, generator=generator).tolist()  # blocks anywhere in the cache
    width, tables, start = max(blocks), [], 0
    for count in blocks:
        tables.append(order[start:start + count] + [0] * (width - count))
        start += count
    return k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), torch.tensor(lengths, dtype=torch.int32)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 64, 128])  # 64 and 128 are compiled for their size
@pytest.mark.parametrize("heads", [(6, 2), (4, 4), (7, 1)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_decode_equals_the_reference(dtype, head_dim, heads, block_size):
    num_heads, num_kv_heads = heads
    lengths = [1, 5, 33, 130, 2, 64]
    k_cache, v_cache, tables, lens = _cache_and_tables(lengths, block_size, num_kv_heads, head_dim, dtype, seed=1)
    query = torch.randn(len(lengths), num_heads, head_dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    scale = head_dim ** -0.5
    expected = reference.paged_decode_attention(query.float(), k_cache.float(), v_cache.float(), tables, lens, scale)
    got = native.paged_decode(query, k_cache, v_cache, tables, lens, scale, 0, 0.0, None)
    assert got.dtype == dtype and got.shape == query.shape
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 1, 7, 40])
@pytest.mark.parametrize("softcap", [None, 0.5, 2.0])
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("head_dim", [32, 64])  # bf16 at 64: the AVX512-BF16 vector code where built
def test_windows_softcapping_and_sinks_equal_the_reference(dtype, window, softcap, with_sinks, head_dim):
    num_heads, num_kv_heads = 6, 2
    lengths = [3, 41, 7, 90]
    k_cache, v_cache, tables, lens = _cache_and_tables(lengths, 4, num_kv_heads, head_dim, dtype, seed=3)
    generator = torch.Generator().manual_seed(4)
    query = (2 * torch.randn(len(lengths), num_heads, head_dim, generator=generator)).to(dtype)
    sinks = torch.randn(num_heads, generator=generator) if with_sinks else None
    expected = reference.paged_decode_attention(query.float(), k_cache.float(), v_cache.float(), tables, lens, 0.3,
                                                sliding_window=window, softcap=softcap, sinks=sinks)
    got = native.paged_decode(query, k_cache, v_cache, tables, lens, 0.3, window or 0, softcap or 0.0, sinks)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)


@needs_native
@pytest.mark.parametrize("dtype,head_dim,tolerance", [(torch.float32, 16, 1e-5), (torch.bfloat16, 64, 1e-2)])
def test_query_rows_may_be_strided_views(dtype, head_dim, tolerance):
    # The lean forward hands the kernel q as a slice of the fused q/k/v product.
    k_cache, v_cache, tables, lens = _cache_and_tables([20, 9], 4, 2, head_dim, dtype, seed=5)
    packed = torch.randn(2, 6 + 2 + 2, head_dim).to(dtype)
    query = packed[:, :6]
    assert not query.is_contiguous()
    expected = reference.paged_decode_attention(query.float(), k_cache.float(), v_cache.float(), tables, lens, 0.25)
    torch.testing.assert_close(native.paged_decode(query, k_cache, v_cache, tables, lens, 0.25, 0, 0.0, None).float(),
                               expected, rtol=tolerance, atol=tolerance)


needs_vector_bf16 = pytest.mark.skipif(native is None or not native.avx512_bf16(),
                                       reason="no AVX512-BF16 here: prefill keeps torch's SDPA")


@needs_vector_bf16
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("window,softcap,with_sinks", [(None, None, False), (9, None, False), (None, 3.0, True)])
def test_a_whole_step_in_one_kernel_call_equals_the_torch_backend(head_dim, window, softcap, with_sinks):
    """Decodes, a fresh prompt and a chunk after cached context, in one step: the native backend's
    single call (each new token a query row ending at its own position) against the torch
    backend's decode + per-prompt SDPA, new K/V written by both."""
    num_heads, num_kv_heads, block_size = 6, 2, 4
    # (context length after the step, new tokens): 2 decodes, a fresh 13-token prompt, 30 cached + 11 new
    sequences = [(25, 1), (7, 1), (13, 13), (41, 11)]
    lengths = [length for length, _ in sequences]
    k_cache, v_cache, tables, lens = _cache_and_tables(lengths, block_size, num_kv_heads, head_dim, torch.bfloat16, 7)
    slots, cu = [], [0]
    for (length, new), table in zip(sequences, tables.tolist()):
        slots += [table[pos // block_size] * block_size + pos % block_size for pos in range(length - new, length)]
        cu.append(cu[-1] + new)
    generator = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(cu[-1], heads, head_dim, generator=generator).to(torch.bfloat16)
               for heads in (num_heads, num_kv_heads, num_kv_heads))
    params = reference.AttentionParams(head_dim ** -0.5, sliding_window=window, softcap=softcap,
                                       sinks=torch.randn(num_heads, generator=generator) if with_sinks else None)
    results = []
    for backend in (attention.NativeCpuBackend(native), attention.TorchBackend()):
        caches = (k_cache.clone(), v_cache.clone())
        meta = attention.AttentionMetadata(
            slot_mapping=torch.tensor(slots), block_tables=tables, context_lens=lens, cu_seqlens_q=cu,
            context_lens_host=lengths, num_decodes=2, kv_caches=[caches], backend=backend)
        results.append((attention.attend(meta, 0, q, k, v, params), caches))
    assert attention.NativeCpuBackend(native).attends_whole_steps(k_cache)
    (native_out, native_caches), (torch_out, torch_caches) = results
    assert torch.equal(native_caches[0], torch_caches[0]) and torch.equal(native_caches[1], torch_caches[1])
    torch.testing.assert_close(native_out.float(), torch_out.float(), rtol=2e-2, atol=2e-2)


def test_other_dtypes_keep_sdpa_for_prefill():
    backend = attention.NativeCpuBackend(native) if native is not None else None
    if backend is None:
        pytest.skip("no C++ compiler here")
    assert not backend.attends_whole_steps(torch.zeros(1, 4, 2, 64))  # fp32: the generic kernel
    assert not backend.attends_whole_steps(torch.zeros(1, 4, 2, 32, dtype=torch.bfloat16))  # no vector code
    assert not attention.TorchBackend().attends_whole_steps(torch.zeros(1, 4, 2, 64, dtype=torch.bfloat16))


@needs_native
def test_bad_inputs_raise_instead_of_reading_out_of_bounds():
    k_cache, v_cache, tables, lens = _cache_and_tables([5], 4, 2, 16, torch.float32, seed=6)
    query = torch.randn(1, 6, 16)
    with pytest.raises(RuntimeError, match="dtype"):
        native.paged_decode(query.double(), k_cache, v_cache, tables, lens, 1.0, 0, 0.0, None)
    with pytest.raises(RuntimeError, match="int32"):
        native.paged_decode(query, k_cache, v_cache, tables.long(), lens, 1.0, 0, 0.0, None)
    with pytest.raises(RuntimeError, match="head"):
        native.paged_decode(torch.randn(1, 5, 16), k_cache, v_cache, tables, lens, 1.0, 0, 0.0, None)


def test_cpu_backend_choice_follows_lmi_cpu_kernels(monkeypatch):
    monkeypatch.setenv(cpu_native.ENV, "torch")
    assert type(attention.select_backend(torch.device("cpu"))) is attention.TorchBackend
    monkeypatch.setenv(cpu_native.ENV, "fast")
    with pytest.raises(ConfigError, match="LMI_CPU_KERNELS='fast'"):
        attention.select_backend(torch.device("cpu"))
    monkeypatch.delenv(cpu_native.ENV)
    expected = attention.TorchBackend if native is None else attention.NativeCpuBackend
    assert type(attention.select_backend(torch.device("cpu"))) is expected


def test_a_kernel_that_does_not_build_leaves_the_torch_path(monkeypatch, tmp_path, caplog):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_native, "SOURCES", [broken])
    monkeypatch.setattr(cpu_native, "_module", None)
    monkeypatch.setattr(cpu_native, "_failure", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    assert cpu_native.load() is None
    assert "could not be built" in caplog.text
    assert type(attention.select_backend(torch.device("cpu"))) is attention.TorchBackend


# ---- the fused elementwise steps of the own forward (kernels/csrc/cpu_layer_ops.cpp) ----------


def _rms_norm_torch(x, weight, eps):
    from batching.lean_forward import rms_norm

    return rms_norm(x, weight, eps)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 40])
@pytest.mark.parametrize("width", [96, 100])  # (bf16 goes 16 features at a time: 100 leaves a tail)
def test_add_rms_norm_adds_in_place_and_normalizes_like_the_model(dtype, rows, width):
    generator = torch.Generator().manual_seed(7)
    x = (3 * torch.randn(rows, width, generator=generator)).to(dtype)
    delta = torch.randn(rows, width, generator=generator).to(dtype)
    weight = torch.randn(width, generator=generator).to(dtype)
    expected_sum = x + delta
    expected = _rms_norm_torch(expected_sum, weight, 1e-5)
    got = native.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(x, expected_sum)  # the residual stream, rounded once as in the model
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # the fp32 mean may sum in another order
    torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance)
    untouched = x.clone()
    torch.testing.assert_close(native.add_rms_norm(x, None, weight, 1e-5).float(),
                               _rms_norm_torch(untouched, weight, 1e-5).float(), rtol=tolerance, atol=tolerance)
    assert torch.equal(x, untouched)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64, 128])  # (bf16 halves of 32 and 64 go 16 features at a time)
def test_rope_rotates_q_and_k_heads_in_place_and_leaves_v(dtype, head_dim):
    from batching.lean_forward import rotate

    generator = torch.Generator().manual_seed(8)
    tokens, heads, kv_heads = 5, 4, 2
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=generator).to(dtype)
    angles = torch.randn(tokens, head_dim // 2, generator=generator)
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    expected = qkv.clone()
    expected[:, :heads + kv_heads] = rotate(qkv[:, :heads + kv_heads], cos[:, None], sin[:, None])
    native.rope_(qkv, cos, sin, heads + kv_heads)
    if dtype == torch.bfloat16:
        assert torch.equal(qkv, expected)  # every product and sum rounded where the model rounds
    else:
        torch.testing.assert_close(qkv, expected, rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_equals_silu_gate_times_up(dtype):
    generator = torch.Generator().manual_seed(9)
    gate_up = (4 * torch.randn(6, 2 * 80, generator=generator)).to(dtype)
    gate_up[0, :5] = torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0])  # the exponent's extremes
    expected = torch.nn.functional.silu(gate_up[:, :80]) * gate_up[:, 80:]
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(native.silu_mul(gate_up).float(), expected.float(), rtol=tolerance, atol=tolerance)


@needs_native
def test_own_forward_with_and_without_compiled_steps_agree(tmp_path):
    from batching.runner import ModelRunner
    from tests.tiny_models import build_model

    folder = build_model(tmp_path / "llama", "llama")
    runner = ModelRunner(str(folder), dtype="fp32", device="cpu")
    assert runner.lean is not None and runner.lean.native is not None
    from batching.model_check import UnsupportedModelError, verify

    compiled = runner.lean.native
    runner.lean.native = None  # torch's operators: must pass the same load-time check
    verify(runner)

    class WithoutRotation:  # the compiled steps with the rotary embedding left out
        def __getattr__(self, name):
            return (lambda *args: None) if name == "rope_" else getattr(compiled, name)

    runner.lean.native = WithoutRotation()
    with pytest.raises(UnsupportedModelError):
        verify(runner)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim, width", [(16, 8), (64, 32)])
def test_rope_with_a_partial_rotary_width_leaves_the_rest_of_each_head(dtype, head_dim, width):
    from batching.lean_forward import rotate

    generator = torch.Generator().manual_seed(10)
    qkv = torch.randn(3, 4, head_dim, generator=generator).to(dtype)
    angles = torch.randn(3, width // 2, generator=generator)
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)  # the first `width` features of each head
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    expected = qkv.clone()
    expected[:, :3] = rotate(qkv[:, :3], cos[:, None], sin[:, None])
    native.rope_(qkv, cos, sin, 3)
    torch.testing.assert_close(qkv, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[:, :3, width:], expected[:, :3, width:])
    assert torch.equal(qkv[:, 3], expected[:, 3])


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_kv_write_equals_index_copy_skips_padding_and_refuses_foreign_slots(dtype):
    """The native backend's K/V write (one compiled call per layer) against the torch backend's
    ``index_copy_``: keys and values strided as the model hands them (views of [1, Hkv, T, D]),
    padding slots (-1) left alone, a slot outside the cache refused."""
    generator = torch.Generator().manual_seed(11)
    k_cache = torch.randn(6, 4, 3, 16, generator=generator).to(dtype)
    v_cache = torch.randn(6, 4, 3, 16, generator=generator).to(dtype)
    key = torch.randn(1, 3, 5, 16, generator=generator).to(dtype)[0].transpose(0, 1)  # [T, Hkv, D], strided
    value = torch.randn(1, 3, 5, 16, generator=generator).to(dtype)[0].transpose(0, 1)
    slots = torch.tensor([3, 17, -1, 0, 23])
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.write_kv(key, value, expected_k, expected_v, slots)
    meta = attention.AttentionMetadata.__new__(attention.AttentionMetadata)
    meta.slot_mapping = slots
    attention.NativeCpuBackend(native).write(key, value, k_cache, v_cache, meta)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    with pytest.raises(RuntimeError, match="outside the cache"):
        native.write_kv(key, value, k_cache, v_cache, torch.tensor([3, 24, -1, 0, 1]))

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
def test_windows_softcapping_and_sinks_equal_the_reference(dtype, window, softcap, with_sinks):
    num_heads, num_kv_heads, head_dim = 6, 2, 32
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
def test_query_rows_may_be_strided_views():
    # The lean forward hands the kernel q as a slice of the fused q/k/v product.
    k_cache, v_cache, tables, lens = _cache_and_tables([20, 9], 4, 2, 16, torch.float32, seed=5)
    packed = torch.randn(2, 6 + 2 + 2, 16)
    query = packed[:, :6]
    assert not query.is_contiguous()
    expected = reference.paged_decode_attention(query.contiguous(), k_cache, v_cache, tables, lens, 0.25)
    torch.testing.assert_close(native.paged_decode(query, k_cache, v_cache, tables, lens, 0.25, 0, 0.0, None),
                               expected, rtol=1e-5, atol=1e-5)


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

"""Decode attention in groups of similar context length (kernels/attention.py): padding is bounded
per group, and the result is the ungrouped one."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.attention import MAX_DECODE_GROUPS, AttentionMetadata, TorchBackend, length_groups
from kernels.reference import AttentionParams


def test_close_lengths_stay_one_group_in_step_order():
    assert length_groups([120, 100, 64, 110]) == [[0, 1, 2, 3]]
    assert length_groups([30, 3, 1]) == [[0, 1, 2]]  # under 64 tokens of padding: not worth a split


def test_far_apart_lengths_split_and_each_group_wastes_at_most_half():
    lengths = [2000, 40, 1900, 700, 650, 30, 260]
    groups = length_groups(lengths)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    assert 1 < len(groups) <= MAX_DECODE_GROUPS
    assert groups[0] == [0, 2]
    for group in groups[:-1]:
        widest = max(lengths[i] for i in group)
        assert all(lengths[i] * 2 >= widest for i in group)


def test_at_most_max_groups():
    lengths = [2 ** k * 100 for k in range(10)]
    assert len(length_groups(lengths)) == MAX_DECODE_GROUPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 48])
def test_grouped_decode_equals_one_padded_batch(dtype, window):
    torch.manual_seed(0)
    block_size, num_kv_heads, head_dim, num_heads = 4, 2, 16, 6
    lengths = [300, 9, 280, 130, 5, 150, 70]
    blocks = [(length + block_size - 1) // block_size for length in lengths]
    num_blocks = sum(blocks) + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(num_blocks).tolist()
    width = max(blocks)
    tables, start = [], 0
    for count in blocks:
        tables.append(order[start:start + count] + [0] * (width - count))
        start += count
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), block_tables=torch.tensor(tables, dtype=torch.int32),
                             context_lens=torch.tensor(lengths, dtype=torch.int32), cu_seqlens_q=list(range(len(lengths) + 1)),
                             context_lens_host=lengths, num_decodes=len(lengths), kv_caches=[], backend=TorchBackend())
    query = torch.randn(len(lengths), num_heads, head_dim, dtype=dtype)
    params = AttentionParams(head_dim ** -0.5, sliding_window=window)
    grouped = TorchBackend().decode(query, k_cache, v_cache, meta, params)
    assert len(meta.prepared[("decode_groups", window, block_size, num_kv_heads)]) > 1 or window is not None
    expected = reference.paged_decode_attention(query, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                                params.scale, sliding_window=window)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(grouped.float(), expected.float(), rtol=tolerance, atol=tolerance)

"""benchmarks/gguf_unquantize.py: a quantized GGUF rewritten with 16-bit weights holds the same
values (the dequantized ones) and the same metadata, so llama.cpp can be run on the very weights
our server serves in bf16."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from benchmarks.gguf_unquantize import unquantize  # noqa: E402

Q = gguf.GGMLQuantizationType


def _quantized_file(path) -> np.ndarray:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 64)).astype(np.float32)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_string("general.name", "tiny")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    quantized = gguf.quants.quantize(weight, Q.Q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", quantized, raw_dtype=Q.Q8_0)
    writer.add_tensor("blk.0.attn_norm.weight", np.linspace(0, 1, 64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.quants.dequantize(quantized, Q.Q8_0)


@pytest.mark.parametrize("target,qtype", [("bf16", Q.BF16), ("f16", Q.F16), ("f32", Q.F32)])
def test_weights_are_the_dequantized_values_and_metadata_is_kept(tmp_path, target, qtype):
    source, destination = tmp_path / "q8.gguf", tmp_path / f"{target}.gguf"
    expected = _quantized_file(source)
    report = unquantize(str(source), str(destination), target)
    assert (report["tensors_converted"], report["tensors_kept"]) == (1, 1)

    reader = gguf.GGUFReader(str(destination))
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["general.name"].contents() == "tiny"
    assert reader.fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "c"]
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    up = tensors["blk.0.ffn_up.weight"]
    assert up.tensor_type == qtype
    values = gguf.quants.dequantize(up.data, qtype) if qtype == Q.BF16 else np.asarray(up.data, dtype=np.float32)
    assert values.shape == expected.shape
    assert np.allclose(values, expected, rtol=1e-2 if qtype != Q.F32 else 0, atol=1e-2 if qtype != Q.F32 else 0)
    norm = tensors["blk.0.attn_norm.weight"]
    assert norm.tensor_type == Q.F32 and np.array_equal(np.asarray(norm.data), np.linspace(0, 1, 64, dtype=np.float32))

"""Linear layers on oneDNN-prepacked weights (batching/packed_linear.py): the same products as
``torch.nn.functional.linear``, each row on its own, applied by the runner on CPU. (That the
engine still serves exactly the greedy tokens of ``generate`` with them is the correctness suite:
its runners are CPU fp32 runners, so every one of those tests runs on packed weights.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batching import packed_linear
from batching.runner import ModelRunner

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_layer_computes_the_linear_product(dtype, tolerance, bias):
    torch.manual_seed(0)
    linear = nn.Linear(72, 40, bias=bias).to(dtype)
    layer = packed_linear.PackedLinear(linear)
    for shape in [(1, 72), (5, 72), (2, 3, 72)]:
        x = torch.randn(shape, dtype=dtype)
        expected = nn.functional.linear(x.float(), linear.weight.float(),
                                        None if linear.bias is None else linear.bias.float())
        got = layer(x)
        assert got.shape == (*shape[:-1], 40) and got.dtype == dtype
        assert torch.allclose(got.float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_the_other_rows(dtype):
    torch.manual_seed(1)
    layer = packed_linear.PackedLinear(nn.Linear(96, 64).to(dtype))
    rows = torch.randn(32, 96, dtype=dtype)
    together = layer(rows)
    for i in (0, 9, 31):
        assert torch.equal(layer(rows[i:i + 1]), together[i:i + 1])


def test_pack_model_replaces_plain_linears_only_and_keeps_refused_ones(monkeypatch):
    class CustomLinear(nn.Linear):  # a subclass may compute something else: left alone
        pass

    model = nn.Sequential(nn.Linear(8, 8), CustomLinear(8, 8), nn.Sequential(nn.Linear(8, 4)), nn.ReLU())
    assert packed_linear.pack_model(model) == 2
    assert isinstance(model[0], packed_linear.PackedLinear) and type(model[1]) is CustomLinear
    assert isinstance(model[2][0], packed_linear.PackedLinear)

    def refuse(self, linear):
        raise RuntimeError("mkldnn_reorder_linear_weight: fp16 path needs the cpu support avx512_fp16")

    monkeypatch.setattr(packed_linear.PackedLinear, "__init__", refuse)
    kept = nn.Sequential(nn.Linear(8, 8))
    assert packed_linear.pack_model(kept) == 0
    assert type(kept[0]) is nn.Linear


def test_the_cpu_runner_serves_on_packed_weights(tiny_llama):
    runner = ModelRunner(str(tiny_llama), dtype="fp32", device="cpu")
    layers = [module for module in runner.model.modules() if isinstance(module, (nn.Linear, packed_linear.PackedLinear))]
    assert layers and all(isinstance(module, packed_linear.PackedLinear) for module in layers)


def test_a_kernel_that_disagrees_with_linear_is_never_used(monkeypatch):
    """Checked once per dtype before packing: were oneDNN's product wrong on some CPU, the model
    would keep torch's linear rather than serve something else."""
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    real_forward = packed_linear.PackedLinear.forward
    monkeypatch.setattr(packed_linear.PackedLinear, "forward", lambda self, x: real_forward(self, x) * 1.5)
    assert packed_linear.pack_model(model) == 0
    assert all(type(layer) is nn.Linear for layer in model)
    monkeypatch.setattr(packed_linear.PackedLinear, "forward", real_forward)
    assert packed_linear.pack_model(model) == 2


def _native_bf16():
    return packed_linear.native_bf16_kernel()


needs_native_bf16 = pytest.mark.skipif(
    _native_bf16() is None, reason="no AVX512-BF16 (or no compiler) here: oneDNN serves bf16 layers")


@needs_native_bf16
@pytest.mark.parametrize("out_features", [40, 48, 100, 144])  # part of a tile, one tile, a ragged last tile
@pytest.mark.parametrize("in_features", [72, 200])  # one chunk of input pairs; several, the last one short
@pytest.mark.parametrize("bias", [True, False])
def test_native_bf16_layer_computes_the_linear_product(out_features, in_features, bias):
    torch.manual_seed(2)
    linear = nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    layer = packed_linear.NativeBf16Linear(linear, _native_bf16())
    # one group of rows, two, three, four (a whole pass), a pass and a row, two passes and more
    for rows in [(1,), (5,), (2, 3), (8,), (9,), (17,), (24,), (32,), (33,), (70,), (0,)]:
        x = torch.randn(*rows, in_features, dtype=torch.bfloat16)
        expected = nn.functional.linear(x.float(), linear.weight.float(),
                                        None if linear.bias is None else linear.bias.float())
        got = layer(x)
        assert got.shape == (*rows, out_features) and got.dtype == torch.bfloat16
        # one bf16 rounding of an fp32 sum: within 2**-8 of each output
        assert torch.allclose(got.float(), expected, rtol=2 ** -8, atol=1e-3)
    strided = torch.randn(6, 2 * in_features, dtype=torch.bfloat16)[:, ::2]  # rows not contiguous in features
    assert torch.allclose(layer(strided).float(), nn.functional.linear(
        strided.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float()),
        rtol=2 ** -8, atol=1e-3)


@needs_native_bf16
@pytest.mark.parametrize("in_features", [96, 200])
def test_native_bf16_rows_do_not_depend_on_the_batch(in_features):
    torch.manual_seed(3)
    layer = packed_linear.NativeBf16Linear(nn.Linear(in_features, 200).to(torch.bfloat16), _native_bf16())
    rows = torch.randn(70, in_features, dtype=torch.bfloat16)
    together = layer(rows)
    for i in (0, 7, 8, 9, 16, 36, 69):
        assert torch.equal(layer(rows[i:i + 1]), together[i:i + 1])
    for begin, end in ((5, 19), (3, 27), (0, 40)):  # two, three and five groups of rows
        assert torch.equal(layer(rows[begin:end]), together[begin:end])


@needs_native_bf16
def test_native_bf16_layer_refuses_other_input_dtypes():
    layer = packed_linear.NativeBf16Linear(nn.Linear(8, 4).to(torch.bfloat16), _native_bf16())
    with pytest.raises(TypeError, match="float32 input"):
        layer(torch.randn(2, 8))


@needs_native_bf16
def test_pack_model_puts_bf16_layers_on_the_native_kernel_and_checks_it(monkeypatch):
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 7), nn.Linear(7, 4)).to(torch.bfloat16)
    assert packed_linear.pack_model(model) == 3
    assert [type(layer) for layer in model] == [packed_linear.NativeBf16Linear, packed_linear.NativeBf16Linear,
                                                 packed_linear.PackedLinear]  # odd input features: oneDNN
    # the kernel's packed weights are cut from one huge-page arena (batching/host_memory.py)
    assert model[0].packed.untyped_storage().data_ptr() == model[1].packed.untyped_storage().data_ptr()

    real_forward = packed_linear.NativeBf16Linear.forward
    monkeypatch.setattr(packed_linear.NativeBf16Linear, "forward", lambda self, x: real_forward(self, x) * 1.5)
    wrong = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8)).to(torch.bfloat16)
    assert packed_linear.pack_model(wrong) == 2
    assert all(type(layer) is packed_linear.PackedLinear for layer in wrong)

    fp32 = nn.Sequential(nn.Linear(16, 8))
    assert packed_linear.pack_model(fp32) == 1 and type(fp32[0]) is packed_linear.PackedLinear


def test_the_torch_kernels_setting_keeps_onednn_for_bf16(monkeypatch):
    monkeypatch.setenv("LMI_CPU_KERNELS", "torch")
    model = nn.Sequential(nn.Linear(16, 8)).to(torch.bfloat16)
    assert packed_linear.pack_model(model) == 1 and type(model[0]) is packed_linear.PackedLinear


@needs_native_bf16
def test_the_cpu_runner_serves_bf16_on_the_native_kernel(tiny_llama):
    runner = ModelRunner(str(tiny_llama), dtype="bf16", device="cpu")
    kinds = {type(module) for module in runner.model.modules()
             if isinstance(module, (nn.Linear, packed_linear.PackedLinear, packed_linear.NativeBf16Linear))}
    assert kinds == {packed_linear.NativeBf16Linear}

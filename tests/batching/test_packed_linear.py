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

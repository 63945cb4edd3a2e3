"""What pyproject.toml promises installers: a torch recent enough for the code that runs."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def test_torch_floor_has_scaled_dot_product_attention_with_enable_gqa():
    # kernels/reference.py calls scaled_dot_product_attention(..., enable_gqa=True): torch 2.5+.
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = next(Requirement(d) for d in dependencies if Requirement(d).name == "torch")
    assert not torch.specifier.contains("2.4.1")
    assert torch.specifier.contains("2.5.0")

"""Model copies on a multi-GPU host get disjoint devices: copy s with tensor-parallel degree n
computes on GPUs s*n .. s*n+n-1. No GPU runs here or in CI: torch's CUDA queries are replaced
by a stand-in host with a given number of GPUs (the only mock in this file)."""

from __future__ import annotations

import pytest
import torch

from batching.devices import COPY_SLOT_VARIABLE, copy_devices
from djl_like.errors import ConfigError


@pytest.fixture
def gpus(monkeypatch):
    def host(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    return host


@pytest.mark.parametrize("slot,degree,expected", [(0, 1, ("cuda:0", 0)), (3, 1, ("cuda:3", 3)),
                                                  (0, 2, ("cuda:0", 0)), (1, 2, ("cuda:2", 2)), (1, 4, ("cuda:4", 4))])
def test_each_copy_gets_its_own_gpus(gpus, slot, degree, expected):
    gpus(8)
    assert copy_devices(None, degree, {COPY_SLOT_VARIABLE: str(slot)}) == expected


def test_more_copies_than_gpus_is_refused_naming_the_count(gpus):
    gpus(3)
    with pytest.raises(ConfigError, match=r"model copy 1 needs GPUs 2..3 .* but 3 GPU\(s\) are visible"):
        copy_devices("cuda", 2, {COPY_SLOT_VARIABLE: "1"})


def test_cpu_copies_share_the_host(gpus):
    gpus(0)
    assert copy_devices(None, 2, {COPY_SLOT_VARIABLE: "5"}) == (None, 0)
    gpus(4)
    assert copy_devices("cpu", 2, {COPY_SLOT_VARIABLE: "5"}) == ("cpu", 0)

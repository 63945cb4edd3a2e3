"""``lmi-bench roofline`` (``python -m benchmarks.roofline``): memory bandwidth, the weight bytes of
one decode step, and the measured batch-1 ms/token, on a tiny model with a small buffer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cli, roofline


def _figure(pattern: str, text: str) -> float:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{pattern!r} not in:\n{text}"
    return float(match.group(1))


def test_roofline_report_on_a_tiny_model_is_consistent(tiny_llama, tmp_path, capsys):
    out = tmp_path / "roofline.json"
    assert cli.main(["roofline", "--model", str(tiny_llama), "--dtype", "fp32", "--buffer-mib", "64",
                     "--repeats", "2", "--new-tokens", "8", "--runs", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    bandwidth = _figure(r"^memory read bandwidth: ([\d.]+) GB/s \(torch.sum over 64 MiB", text)
    weight_bytes = _figure(r"^weight bytes per decode step: (\d+) ", text)
    roofline_ms = _figure(r"^roofline: ([\d.e+-]+) ms/token", text)
    measured_ms = _figure(r"^measured: ([\d.e+-]+) ms/token \(batch 1, decode steps only", text)
    share = _figure(r"^share of roofline: ([\d.]+) %", text)
    assert bandwidth > 0 and weight_bytes > 0 and measured_ms > 0
    assert roofline_ms == pytest.approx(weight_bytes / (bandwidth * 1e9) * 1000, rel=2e-3)
    assert share == pytest.approx(100 * roofline_ms / measured_ms, rel=2e-3, abs=0.05)
    assert re.search(r"^CPU: .+", text, re.MULTILINE)
    assert re.search(r"^CPU flags: avx2=(yes|no) avx512f=(yes|no) avx512_bf16=(yes|no) amx_bf16=(yes|no) "
                     r"avx512_vnni=(yes|no)$", text, re.MULTILINE)
    assert "(LlamaForCausalLM, float32)" in text and "untied" in text
    result = json.loads(out.read_text())
    assert result["command"].startswith("lmi-bench roofline --model ")
    assert result["weight_bytes"] == weight_bytes and len(result["ms_per_token_runs"]) == 2
    assert result["ms_per_token"] == min(result["ms_per_token_runs"])
    assert result["share_percent"] == pytest.approx(
        100 * result["weight_bytes"] / (result["bandwidth_gb_s"] * 1e9) * 1000 / result["ms_per_token"])


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_count_a_tied_matrix_once_and_a_lookup_as_one_row(tied):
    import torch
    import transformers as hf

    config = hf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = hf.LlamaForCausalLM(config).to(torch.bfloat16)
    figures = roofline.decode_weight_bytes(model)
    every = sum(p.numel() for p in model.parameters())  # parameters() lists a tied matrix once
    embedding = 100 * 32
    assert figures["num_parameters"] == every and figures["parameter_bytes"] == 2 * every
    assert figures["tied_embeddings"] is tied
    # Tied: the LM head reads the matrix whole. Untied: the input lookup reads one row.
    assert figures["weight_bytes"] == 2 * (every if tied else every - embedding + 32)


def test_module_entry_point_and_bad_options(capsys):
    done = subprocess.run([sys.executable, "-m", "benchmarks.roofline", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and "--buffer-mib" in done.stdout
    assert cli.main(["roofline", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err

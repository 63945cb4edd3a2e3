"""A model that cannot be loaded, for any reason, stops ``serve`` with a non-zero status and the
reason in one line, instead of leaving ``/ping`` at 503 forever."""

from __future__ import annotations

import os

from container.serve import load_failure_line
from djl_like.errors import ConfigError
from tests.container.test_serve_http import model_folder, run_serve


def test_a_truncated_weights_file_stops_serve_with_the_reason_in_one_line(tiny_llama, tmp_path):
    folder = model_folder(tmp_path, tiny_llama, {"option.rolling_batch": "auto"})
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    finished = run_serve(folder, timeout=120)
    assert finished.returncode != 0
    lines = [line for line in finished.stderr.splitlines() if line.startswith("serve: ")]
    assert len(lines) == 1, finished.stderr[-3000:]
    assert lines[0].startswith("serve: the model could not be loaded: ")
    assert "SafetensorError" in lines[0], lines[0]


def test_the_reason_is_one_line_whatever_the_message_holds():
    assert load_failure_line(OSError("cannot read\n  /opt/ml/model/x: permission denied")) == (
        "serve: the model could not be loaded: OSError: cannot read /opt/ml/model/x: permission denied")
    assert load_failure_line(ConfigError("option.max_model_len=4096 exceeds 512")) == (
        "serve: invalid configuration: option.max_model_len=4096 exceeds 512")

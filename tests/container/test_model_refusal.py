"""A model the engine cannot serve exactly stops ``serve`` at start with the reason; it never
answers ``/ping`` as healthy (issue: wrong text served silently is the worst failure)."""

from __future__ import annotations

from tests.container.test_serve_http import run_serve
from tests.tiny_models import build_model


def test_serve_refuses_a_model_it_cannot_serve_exactly(tmp_path):
    folder = build_model(tmp_path / "bloom", "bloom")
    (folder / "serving.properties").write_text("option.max_kv_cache_tokens=512\n")
    finished = run_serve(folder, timeout=180)
    assert finished.returncode != 0
    assert "cannot serve model type 'bloom'" in finished.stderr
    assert "attention interface" in finished.stderr
    assert "Llama, Mistral" in finished.stderr  # the architectures served instead


def test_serve_refuses_a_max_model_len_where_longrope_depends_on_the_batch(tmp_path):
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}
    folder = build_model(tmp_path / "phi3", "phi3", rope_parameters=rope, original_max_position_embeddings=64)
    (folder / "serving.properties").write_text("option.max_model_len=256\noption.max_kv_cache_tokens=512\n")
    finished = run_serve(folder, timeout=180)
    assert finished.returncode != 0
    assert "option.max_model_len=256: beyond 64 tokens" in finished.stderr

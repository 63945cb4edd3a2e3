"""``lmi-bench embeddings``: one real server per batch size, every request answered, batching seen."""

from __future__ import annotations

import json

from benchmarks import cli
from benchmarks.embeddings import embedding_texts


def test_texts_are_seeded_and_varied():
    assert embedding_texts(5, seed=3) == embedding_texts(5, seed=3)
    assert len({len(text.split()) for text in embedding_texts(50)}) > 10


def test_embeddings_benchmark_compares_batch_sizes(tmp_path, capsys):
    out = tmp_path / "embeddings.json"
    status = cli.main(["embeddings", "--batch-sizes", "1,4", "--num-requests", "16", "--concurrency", "4",
                       "--max-batch-delay", "200", "--torch-threads", "1", "--out", str(out), "--markdown"])
    assert status == 0
    results = json.loads(out.read_text())
    assert [row["batch_size"] for row in results["rows"]] == [1, 4]
    for row in results["rows"]:
        metrics = row["metrics"]
        assert metrics["failed"] == 0 and metrics["requests"] == 16
        assert metrics["requests_per_s"] > 0
        assert metrics["latency_ms"]["p50"] <= metrics["latency_ms"]["p99"]
    assert results["rows"][0]["metrics"]["server"]["max_batch_size"] == 1
    assert results["rows"][1]["metrics"]["server"]["max_batch_size"] > 1
    assert results["command"].startswith("lmi-bench embeddings --batch-sizes 1,4")
    assert "| batch_size | req/s |" in capsys.readouterr().out

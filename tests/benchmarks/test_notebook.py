"""The batching-comparison notebook runs headless, top to bottom, on a tiny model and draws its
figures (inline images and PNG files)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "batching_comparison.ipynb"
REPO_ROOT = NOTEBOOK.parents[1]


def test_notebook_runs_the_comparison_and_draws_its_figures(tiny_llama, tmp_path, monkeypatch):
    params = {"MODEL": str(tiny_llama), "WORKLOAD": "seed", "SCALE": 0.05, "NUM_REQUESTS": 6, "CONCURRENCY": 3,
              "STRATEGIES": ["dynamic", "paged"], "PEERS": [], "OUTPUT": str(tmp_path / "results.json"),
              "FIGURES": str(tmp_path / "figures"), "SWEEP_STRATEGIES": ["paged"], "SWEEP_LEVELS": [1, 2]}
    monkeypatch.setenv("LMI_BENCH_NOTEBOOK_PARAMS", json.dumps(params))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)

    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    images = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    assert len(images) == 4  # throughput, latency, KV usage, the concurrency sweep
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "seed-kv_usage.png", "seed-latency.png", "seed-sweep.png", "seed-throughput.png"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["strategy"] for row in results["rows"]] == ["dynamic", "paged"]
    assert all(row["metrics"]["completed"] == 6 for row in results["rows"])


def test_committed_notebook_holds_the_outputs_of_a_real_run():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert "LMI_BENCH_NOTEBOOK_PARAMS" in code[0].source  # parameters first, overridable
    assert all(cell.get("execution_count") for cell in code), "commit the notebook executed"
    assert sum("image/png" in output.get("data", {}) for cell in code for output in cell.outputs) == 4

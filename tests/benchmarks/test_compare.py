"""The comparison command: serving.properties per strategy, real servers on a tiny model, the
table and the result file."""

from __future__ import annotations

import json

import pytest

from benchmarks import cli, compare
from benchmarks.compare import CompareSettings
from benchmarks.workloads import build_workload
from djl_like.config import ServingConfig, Strategy
from tests.benchmarks.test_loadgen import StandIn


@pytest.mark.parametrize("strategy, expected, prefix_caching", [
    ("none", Strategy.DYNAMIC, False),
    ("dynamic", Strategy.DYNAMIC, False),
    ("rolling", Strategy.ROLLING, False),
    ("paged", Strategy.PAGED, False),
    ("paged+prefix", Strategy.PAGED, True),
])
def test_each_strategy_gets_its_own_batching_and_the_same_memory(strategy, expected, prefix_caching):
    workload = build_workload("memory-bound", num_requests=4, concurrency=12)
    properties = compare.strategy_properties(strategy, "/models/m", workload, CompareSettings())
    config = ServingConfig.from_properties(properties)

    assert config.strategy is expected
    assert config.enable_prefix_caching is prefix_caching
    assert config.model_id == "/models/m"
    assert config.max_kv_cache_tokens == 2048 and config.max_model_len == 512  # equal for every strategy
    assert config.batch_size == {"none": 1, "dynamic": 12}.get(strategy, 1)


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="none, dynamic, rolling, paged, paged\\+prefix"):
        compare.strategy_properties("orca", "/m", build_workload("seed", num_requests=1), CompareSettings())


def _row(strategy, req_s, kind="server"):
    return {"strategy": strategy, "kind": kind, "metrics": {
        "request_throughput": req_s, "output_throughput": 10 * req_s, "failed": 0,
        "ttft_ms": {"p50": 5.0}, "tpot_ms": {"p50": 1.0}, "e2e_ms": {"p50": 50.0, "p99": 90.0},
        "kv": {"running_peak": 4, "kv_waste_mean": 0.5, "preemptions": 0, "prefix_hit_rate": None}}}


def test_table_shows_throughput_relative_to_dynamic_batching():
    results = {"rows": [_row("dynamic", 2.0), _row("paged", 5.0),
                        {"strategy": "hf-continuous-batching", "kind": "offline",
                         "metrics": {"request_throughput": 1.0, "output_throughput": 10.0, "failed": 0}}]}
    rows = compare.table_rows(results)
    assert [row["x dynamic"] for row in rows] == [1.0, 2.5, 0.5]
    assert rows[2]["TTFT p50 ms"] is None  # offline peers have no per-token latencies
    text = compare.format_table(results, markdown=True)
    assert text.splitlines()[0].startswith("| strategy | req/s |")
    assert "| paged | 5.000 | 50.0 | 2.500 |" in text


def test_compare_command_runs_one_server_per_strategy_and_the_peer(tiny_llama, tmp_path, capsys):
    out, figures = tmp_path / "results.json", tmp_path / "figures"
    code = cli.main(["compare", "--model", str(tiny_llama), "--workload", "seed", "--scale", "0.05",
                     "--num-requests", "6", "--concurrency", "3", "--strategies", "dynamic,rolling,paged",
                     "--peers", "hf-continuous-batching", "--out", str(out), "--figures", str(figures),
                     "--no-progress", "--log-dir", str(tmp_path / "logs")])
    assert code == 0, capsys.readouterr()

    results = json.loads(out.read_text())
    assert [row["strategy"] for row in results["rows"]] == ["dynamic", "rolling", "paged", "hf-continuous-batching"]
    for row in results["rows"]:
        metrics = row["metrics"]
        assert metrics["completed"] == 6 and metrics["failed"] == 0
        assert metrics["request_throughput"] > 0 and metrics["output_throughput"] > 0
        assert metrics["wrong_output_length"] == 0  # ignore_eos: exact lengths everywhere
    servers = {row["strategy"]: row for row in results["rows"] if row["kind"] == "server"}
    # Same memory for all: one KV capacity and max_model_len in every serving.properties.
    assert len({(r["properties"]["option.max_kv_cache_tokens"], r["properties"]["option.max_model_len"])
                for r in servers.values()}) == 1
    for name, row in servers.items():
        assert row["metrics"]["server_stats"]["strategy"] == name
        assert row["metrics"]["kv"]["max_batch_size"] >= 2  # 3 clients were batched together
        assert row["metrics"]["ttft_ms"]["p50"] > 0
    assert results["command"].startswith("lmi-bench compare --model")
    assert sorted(p.name for p in figures.iterdir()) == ["seed-kv_usage.png", "seed-latency.png",
                                                          "seed-throughput.png"]
    assert "x dynamic" in capsys.readouterr().out


def test_a_server_that_cannot_start_stops_the_comparison_with_its_message(tmp_path):
    settings = CompareSettings(strategies=["paged"], progress=False, ready_timeout_s=120)
    workload = build_workload("seed", num_requests=1, scale=0.05, concurrency=1)
    with pytest.raises(RuntimeError, match="no-such-model"):
        compare.compare(str(tmp_path / "no-such-model"), workload, settings=settings)


def test_run_command_reports_and_saves_a_benchmark(tmp_path, capsys):
    out = tmp_path / "run.json"
    with StandIn(delay=0.001) as server:
        code = cli.main(["run", "--url", server.url, "--workload", "seed", "--scale", "0.05", "--num-requests", "5",
                         "--concurrency", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    saved = json.loads(out.read_text())
    assert saved["completed"] == 5 and saved["workload"]["name"] == "seed"
    assert saved["command"] == ("lmi-bench run --url " + server.url + " --workload seed --scale 0.05 "
                                "--num-requests 5 --concurrency 2 --out " + str(out) + " --no-progress")
    assert "Request throughput (req/s)" in capsys.readouterr().out


def test_levels_run_the_comparison_at_each_concurrency_into_one_table(tiny_llama, tmp_path, capsys):
    """``--levels``: every server restarted per level with that level's limits and
    ``--requests-per-client`` x level requests; one table with weights and latency percentiles."""
    out = tmp_path / "levels.json"
    code = cli.main(["compare", "--model", str(tiny_llama), "--workload", "peers", "--scale", "0.1",
                     "--levels", "1,3", "--requests-per-client", "2", "--strategies", "paged,paged+int8",
                     "--dtype", "fp32", "--out", str(out), "--no-progress", "--markdown"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads(out.read_text())
    assert [level["concurrency"] for level in results["levels"]] == [1, 3]
    for level in results["levels"]:
        assert [row["strategy"] for row in level["rows"]] == ["paged", "paged+int8"]
        for row in level["rows"]:
            assert row["metrics"]["completed"] == 2 * level["concurrency"] and row["metrics"]["failed"] == 0
            assert row["properties"]["option.max_rolling_batch_size"] == str(level["concurrency"])
        assert level["rows"][1]["properties"]["option.quantize"] == "int8"
    assert isinstance(results["machine"]["cpu_flags"], list)
    lines = printed.splitlines()
    assert lines[0].startswith("CPU: ") and "| concurrency | server | weights | out tok/s | TTFT p50 ms |" in printed
    assert "| 3 | paged+int8 | fp32 + int8 weights |" in printed


@pytest.mark.parametrize("levels", ["1,x", "0", ","])
def test_bad_levels_are_refused_naming_the_option(levels, capsys):
    assert cli.main(["compare", "--levels", levels, "--strategies", "paged"]) == 2
    assert "--levels must be comma-separated positive integers" in capsys.readouterr().err


def test_set_puts_serving_properties_over_the_workloads_on_every_strategy():
    settings = CompareSettings(extra_properties=cli._properties(
        ["option.max_rolling_batch_prefill_tokens=256", " option.enable_prefix_caching = true"]))
    workload = build_workload("peers", num_requests=2, concurrency=2)
    assert workload.server_options["option.max_rolling_batch_prefill_tokens"] == "1024"
    for strategy in ("rolling", "paged", "paged+int4"):
        properties = compare.strategy_properties(strategy, "/m", workload, settings)
        assert properties["option.max_rolling_batch_prefill_tokens"] == "256"
        assert properties["option.enable_prefix_caching"] == "true"


@pytest.mark.parametrize("entry", ["option.dtype", "=bf16", ""])
def test_bad_set_entries_are_refused_naming_the_option(entry, capsys):
    assert cli.main(["compare", "--set", entry, "--strategies", "paged"]) == 2
    assert "--set takes KEY=VALUE" in capsys.readouterr().err

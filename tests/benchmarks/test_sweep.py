"""``lmi-bench sweep``: the concurrency sweep against a real server, and the recommendation rule
(largest level meeting the latency target, cut back where throughput stops growing)."""

from __future__ import annotations

import pytest

from benchmarks.compare import CompareSettings
from benchmarks.sweep import LatencyTarget, format_sweep, plot_sweep, recommend, sweep


def _point(concurrency, tok_s, tpot_p90, failed=0):
    distribution = {"p90": tpot_p90, "p99": tpot_p90}
    return {"concurrency": concurrency, "metrics": {
        "output_throughput": tok_s, "failed": failed, "tpot_ms": distribution, "ttft_ms": distribution,
        "itl_ms": distribution, "e2e_ms": distribution}}


def test_recommendation_is_the_largest_level_meeting_the_target():
    points = [_point(1, 20, 40), _point(2, 38, 45), _point(4, 70, 60), _point(8, 120, 110), _point(16, 150, 210)]
    advice = recommend(points, LatencyTarget.parse("tpot_p90_ms<=150"))
    assert advice["concurrency"] == 8 and "tpot_p90_ms <= 150" in advice["reason"]


def test_recommendation_stops_where_throughput_stops_growing():
    points = [_point(1, 20, 40), _point(2, 38, 45), _point(4, 39, 60), _point(8, 41, 110)]
    advice = recommend(points, None)
    assert advice["concurrency"] == 2 and "less than 5%" in advice["reason"]


def test_no_level_meeting_the_target_is_said_so():
    advice = recommend([_point(1, 20, 400)], LatencyTarget.parse("tpot_p90_ms<=100"))
    assert advice["concurrency"] is None and "no level meets" in advice["reason"]


@pytest.mark.parametrize("text", ["tpot<=100", "tpot_p90_ms<100", "tpot_p90_ms<=fast"])
def test_a_malformed_target_names_the_metrics(text):
    with pytest.raises(ValueError, match="METRIC<=MS with METRIC one of tpot_p90_ms"):
        LatencyTarget.parse(text)


@pytest.mark.slow
def test_sweep_against_a_real_server(tiny_llama, tmp_path):
    result = sweep(str(tiny_llama), "seed", strategies=["paged"], levels=[1, 3], requests_per_client=1,
                   scale=0.05, target=LatencyTarget.parse("ttft_p90_ms<=60000"),
                   settings=CompareSettings(dtype="fp32", torch_threads=1, progress=False))
    [curve] = result["curves"]
    assert [p["concurrency"] for p in curve["points"]] == [1, 3]
    assert [p["metrics"]["completed"] for p in curve["points"]] == [1, 3]
    assert all(p["metrics"]["failed"] == 0 and p["metrics"]["output_throughput"] > 0 for p in curve["points"])
    assert curve["recommendation"]["concurrency"] in (1, 3)
    assert "paged" in format_sweep(result)
    [figure] = plot_sweep(result, tmp_path)
    assert figure.stat().st_size > 10_000


def test_sweep_command_refuses_a_malformed_target_with_exit_2(capsys):
    from benchmarks import cli

    assert cli.main(["sweep", "--target", "fast", "--levels", "1"]) == 2
    assert "latency target 'fast'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_serving_peer_gets_its_own_curve(tiny_llama, tmp_path, monkeypatch):
    """``--server-peers``: the peer is started once, sized for the largest level, driven through
    OpenAI /v1/completions at every level, and gets a curve and a recommendation. The real peers
    (vLLM, llama.cpp) are never installed in CI; a stand-in plays the peer here: our own server,
    launched through the peer machinery (PeerServerProcess, /v1/models readiness, the OpenAI
    client), on the tiny model."""
    import sys

    from benchmarks import cli, server_peers

    launches = []

    def stand_in(name, *, port, concurrency, threads, max_model_len, model_folder, dtype, gguf=None):
        folder = tmp_path / "stand-in"
        folder.mkdir(exist_ok=True)
        (folder / "serving.properties").write_text(
            f"option.model_id={model_folder}\noption.served_model_name={server_peers.SERVED_MODEL_NAME}\n"
            f"option.max_rolling_batch_size={concurrency}\noption.max_model_len={max_model_len}\n"
            f"option.dtype={dtype}\noption.cpu_threads={threads}\n")
        launches.append({"name": name, "concurrency": concurrency, "threads": threads})
        return server_peers.PeerLaunch(name, [sys.executable, "-m", "container.serve", "--model-dir", str(folder)],
                                       {"SERVING_PORT": str(port), "HF_HUB_OFFLINE": "1"}, dtype)

    monkeypatch.setattr(server_peers, "launch_peer", stand_in)
    out = tmp_path / "sweep.json"
    code = cli.main(["sweep", "--model", str(tiny_llama), "--workload", "seed", "--scale", "0.05",
                     "--strategies", "paged", "--server-peers", "vllm-cpu", "--levels", "1,3",
                     "--requests-per-client", "1", "--dtype", "fp32", "--torch-threads", "1", "--no-progress",
                     "--out", str(out)])
    assert code == 0
    assert launches == [{"name": "vllm-cpu", "concurrency": 3, "threads": 1}]
    import json

    curves = json.loads(out.read_text())["curves"]
    assert [(c["strategy"], c["kind"]) for c in curves] == [("paged", "server"), ("vllm-cpu", "server-peer")]
    peer = curves[1]
    assert [p["concurrency"] for p in peer["points"]] == [1, 3]
    assert all(p["metrics"]["completed"] == p["concurrency"] and p["metrics"]["failed"] == 0 for p in peer["points"])
    assert peer["recommendation"]["concurrency"] in (1, 3)


def test_sweep_refuses_an_unknown_server_peer(capsys):
    from benchmarks import cli

    assert cli.main(["sweep", "--server-peers", "tgi", "--levels", "1"]) == 2
    assert "unknown server peers: tgi" in capsys.readouterr().err

"""Custom handlers (``option.entryPoint`` / ``model.py``) served by a real ``serve``: handlers
written for LMI run unchanged, dynamic batching gives each caller its own slice, streams stream,
a handler can drive the project's engine, and errors follow the contract."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.container.test_serve_http import QUIET_ENV, run_serve
from tests.server import start_server

HANDLERS = Path(__file__).parent / "handlers"


def handler_folder(folder: Path, handler: str, properties: dict[str, str], target: str = "model.py",
                   model: Path | None = None) -> Path:
    """A model folder holding ``handler`` (a file of tests/container/handlers) as ``target``."""
    if model is not None:
        shutil.copytree(model, folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(HANDLERS / handler, folder / target)
    (folder / "serving.properties").write_text("".join(f"{k}={v}\n" for k, v in properties.items()))
    return folder


def invoke(server, body, **kwargs) -> requests.Response:
    return requests.post(server.url + "/invocations", json=body, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    folder = handler_folder(tmp_path_factory.mktemp("echo") / "model", "echo_batch.py",
                            {"batch_size": "4", "max_batch_delay": "1000"})
    with start_server(folder, QUIET_ENV) as server:
        yield server


# --- a JSON echo with dynamic batching -----------------------------------------------------------


def test_lmi_handler_runs_unchanged_and_sees_headers_and_init_properties(echo_server):
    response = invoke(echo_server, {"question": "ça va?"}, headers={"X-Echo-Header": "hello"})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["echo"] == {"question": "ça va?"}
    assert body["header"] == "hello"  # HTTP headers are properties, case-insensitive
    assert Path(body["model_dir"]).name == "model"  # the init call's properties
    assert body["batch_option"] == "4"
    assert response.headers["X-Echo-Index"] == "0"  # batch_0_ prefix taken off for a lone request


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(echo_server):
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda index: invoke(echo_server, {"index": index}), range(8)))
    assert [response.status_code for response in responses] == [200] * 8
    assert [response.json()["echo"] for response in responses] == [{"index": i} for i in range(8)]
    assert max(response.json()["batch_size"] for response in responses) > 1
    stats = requests.get(echo_server.url + "/stats", timeout=10).json()
    assert stats["mode"] == "custom-handler"
    assert any(int(size) > 1 for size in stats["batch_size_histogram"])


def test_an_exception_in_handle_fails_only_its_request(echo_server):
    bodies = [{"index": i} for i in range(4)]
    bodies[2] = {"fail": "on purpose"}
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda body: invoke(echo_server, body), bodies))
    assert [response.status_code for response in responses] == [200, 200, 424, 200]
    error = responses[2].json()
    assert error["code"] == 424 and error["type"] == "ModelError"
    assert "ValueError: asked to fail: on purpose" in error["message"]
    assert responses[3].json()["echo"] == {"index": 3}


def test_a_body_that_is_not_json_is_a_400(echo_server):
    response = requests.post(echo_server.url + "/invocations", data=b"{nope", timeout=30)
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["message"]


def test_body_over_the_payload_limit_is_413(tmp_path):
    folder = handler_folder(tmp_path / "model", "echo_batch.py", {"max_payload_mb": "1"})
    with start_server(folder, QUIET_ENV) as server:
        response = requests.post(server.url + "/invocations", data=b"x" * (2 * 1024 * 1024), timeout=30)
    assert response.status_code == 413


# --- streaming -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def streaming_server(tmp_path_factory):
    # A named entry point file (not model.py), given through DJL's environment variable.
    folder = handler_folder(tmp_path_factory.mktemp("stream") / "model", "streaming.py", {}, target="stream.py")
    with start_server(folder, {**QUIET_ENV, "DJL_ENTRY_POINT": "stream.py"}) as server:
        yield server


def test_stream_content_arrives_as_lmi_jsonlines(streaming_server):
    with invoke(streaming_server, {"inputs": "one two three"}, stream=True) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/jsonlines"
        assert "Content-Length" not in response.headers  # chunked: sent as produced
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines == [{"outputs": "one"}, {"outputs": "two"}, {"outputs": "three"}]


def test_a_stream_that_breaks_ends_with_an_error_line(streaming_server):
    response = invoke(streaming_server, {"inputs": "a b c d", "break_after": 2})
    lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[:2] == [{"outputs": "a"}, {"outputs": "b"}]
    assert lines[2]["code"] == 424
    assert "broke after 2 words" in lines[2]["message"]


# --- a handler that drives the project's engine --------------------------------------------------


@pytest.fixture(scope="module")
def engine_server(tiny_llama, tmp_path_factory):
    folder = handler_folder(tmp_path_factory.mktemp("engine") / "model", "engine_handler.py",
                            {"option.rolling_batch": "auto", "option.paged_attention": "true"}, model=tiny_llama)
    with start_server(folder, QUIET_ENV) as server:
        yield server


def greedy_reference(model: Path, prompt: str, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = reference.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, ids.shape[1]:])


def test_engine_handler_generates_what_the_model_generates(engine_server, tiny_llama):
    prompt = "The capital of France is"
    parameters = {"max_new_tokens": 8, "ignore_eos": True}
    response = invoke(engine_server, {"prompt": prompt, "parameters": parameters})
    assert response.status_code == 200, response.text
    expected = greedy_reference(tiny_llama, prompt, 8)
    assert response.json() == {"answer": expected, "length": len(expected)}
    with invoke(engine_server, {"prompt": prompt, "parameters": parameters, "stream": True}, stream=True) as streamed:
        pieces = [json.loads(line)["outputs"] for line in streamed.iter_lines() if line]
    assert "".join(pieces) == expected and len(pieces) > 1


def test_engine_handler_keeps_rolling_batching_across_requests(engine_server):
    body = {"prompt": "Continuous batching", "parameters": {"max_new_tokens": 24, "ignore_eos": True}}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: invoke(engine_server, body), range(6)))
    assert [response.status_code for response in responses] == [200] * 6
    assert len({response.json()["answer"] for response in responses}) == 1
    stats = invoke(engine_server, {"stats": True}).json()
    assert stats["strategy"] == "paged"
    assert stats["max_batch_size"] > 1  # handle calls overlapped and shared engine steps


def test_engine_handler_bad_parameters_are_a_400(engine_server):
    response = invoke(engine_server, {"prompt": "x", "parameters": {"max_new_tokens": -1}})
    assert response.status_code == 400
    assert "max_new_tokens" in response.json()["message"]


# --- start-up: import failures, requirements.txt ----------------------------------------------------


def test_a_handler_that_fails_to_import_stops_serve_with_the_traceback_last_line(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.py").write_text("import json\nimport no_such_module_for_lmi_tests\n\ndef handle(inputs):\n    pass\n")
    finished = run_serve(folder, timeout=120)
    assert finished.returncode != 0
    assert "ModuleNotFoundError: No module named 'no_such_module_for_lmi_tests'" in finished.stderr
    assert "failed to import" in finished.stderr


def test_a_missing_handler_function_stops_serve(tmp_path):
    folder = handler_folder(tmp_path / "model", "echo_batch.py", {"option.handler": "predict"})
    finished = run_serve(folder, timeout=120)
    assert finished.returncode != 0
    assert "defines no function 'predict'" in finished.stderr


def test_a_missing_entry_point_file_stops_serve(tmp_path):
    folder = handler_folder(tmp_path / "model", "echo_batch.py", {"option.entryPoint": "nothere.py"})
    finished = run_serve(folder, timeout=120)
    assert finished.returncode != 0
    assert "option.entryPoint='nothere.py': no such file" in finished.stderr


WHEEL_PACKAGE = "lmi_requirements_probe"


def build_wheel(folder: Path) -> Path:
    """A one-module wheel written by hand (no build backend, no network)."""
    name = f"{WHEEL_PACKAGE}-0.1-py3-none-any.whl"
    info = f"{WHEEL_PACKAGE}-0.1.dist-info"
    files = {f"{WHEEL_PACKAGE}.py": "ANSWER = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {WHEEL_PACKAGE}\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()]
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(folder / name, "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)
    return folder / name


def requirements_folder(folder: Path, properties: dict[str, str]) -> Path:
    folder.mkdir(parents=True)
    wheel = build_wheel(folder)
    (folder / "requirements.txt").write_text(f"{wheel}\n")
    (folder / "model.py").write_text(
        "from djl_python import Output\n\ndef handle(inputs):\n    if inputs.is_empty():\n        return None\n"
        f"    import {WHEEL_PACKAGE}\n    return Output().add_as_json({{'answer': {WHEEL_PACKAGE}.ANSWER}})\n")
    (folder / "serving.properties").write_text("".join(f"{k}={v}\n" for k, v in properties.items()))
    return folder


@pytest.fixture
def uninstall_probe():
    yield
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", WHEEL_PACKAGE], check=False)


def test_requirements_are_not_installed_by_default(tmp_path, uninstall_probe):
    folder = requirements_folder(tmp_path / "model", {})
    with start_server(folder, QUIET_ENV) as server:
        response = invoke(server, {})
        logs = server.logs()
    assert response.status_code == 424  # the handler's import of the package fails: not installed
    assert "No module named 'lmi_requirements_probe'" in response.json()["message"]
    assert "set option.install_requirements=true" in logs


def test_requirements_are_installed_when_allowed(tmp_path, uninstall_probe):
    folder = requirements_folder(tmp_path / "model", {"option.install_requirements": "true"})
    with start_server(folder, QUIET_ENV, timeout=180) as server:
        response = invoke(server, {})
    assert response.status_code == 200, response.text
    assert response.json() == {"answer": 42}


def test_uninstallable_requirements_stop_serve(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(HANDLERS / "echo_batch.py", folder / "model.py")
    (folder / "requirements.txt").write_text("this is not a requirement !!\n")
    (folder / "serving.properties").write_text("option.install_requirements=true\n")
    finished = run_serve(folder, timeout=120)
    assert finished.returncode != 0
    assert "pip could not install" in finished.stderr


def test_entry_point_may_be_an_importable_module(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()  # nothing but the properties: the handler is a module on the path
    env = {**QUIET_ENV, "OPTION_ENTRYPOINT": "tests.container.handlers.echo_batch"}
    with start_server(folder, env) as server:
        response = invoke(server, {"hello": "module"})
    assert response.status_code == 200, response.text
    assert response.json()["echo"] == {"hello": "module"}

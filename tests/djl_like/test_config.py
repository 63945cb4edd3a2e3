"""serving.properties keys -> ServingConfig: values, strategy choice, validation messages."""

from __future__ import annotations

import copy
import dataclasses
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from djl_like.config import ServingConfig, Strategy, choose_strategy, load_config, served_model_name
from djl_like.errors import ConfigError

MIB = 1024 * 1024


def test_defaults():
    config = ServingConfig.from_properties({}, model_dir="/models/m")
    assert config == ServingConfig(model_dir="/models/m")
    assert (config.strategy, config.engine, config.batch_size, config.job_queue_size) == (
        Strategy.PAGED, "Python", 1, 1000)
    assert (config.max_rolling_batch_size, config.max_rolling_batch_prefill_tokens) == (32, 4096)
    assert (config.dtype, config.device, config.tensor_parallel_degree) == ("auto", None, 1)
    assert (config.block_size, config.max_kv_cache_tokens, config.max_model_len) == (16, None, None)
    assert (config.port, config.max_payload_bytes, config.predict_timeout_s) == (8080, 6 * MIB, 120.0)
    assert config.trust_remote_code is False
    assert config.enable_prefix_caching is False
    assert config.output_formatter == "json"
    assert config.explicit == frozenset()
    assert dict(config.unknown) == {}


@pytest.mark.parametrize(
    "key, value, field, expected",
    [
        ("engine", "MPI", "engine", "MPI"),
        ("engine", "python", "engine", "Python"),
        ("batch_size", "1", "batch_size", 1),
        ("max_batch_delay", "0", "max_batch_delay_ms", 0),
        ("max_batch_delay", "1000", "max_batch_delay_ms", 1000),
        ("job_queue_size", "5", "job_queue_size", 5),
        ("minWorkers", "2", "num_workers", 2),
        ("maxWorkers", "3", "num_workers", 3),
        ("port", "9090", "port", 9090),
        ("port", "65535", "port", 65535),
        ("max_payload_mb", "20", "max_payload_bytes", 20 * MIB),
        ("option.model_id", "s3://bucket/llama", "model_id", "s3://bucket/llama"),
        ("option.revision", "v1.0", "revision", "v1.0"),
        ("option.entryPoint", "model.py", "entry_point", "model.py"),
        ("option.entryPoint", "djl_python.huggingface", "entry_point", None),
        ("option.max_rolling_batch_size", "64", "max_rolling_batch_size", 64),
        ("option.max_rolling_batch_prefill_tokens", "1024", "max_rolling_batch_prefill_tokens", 1024),
        ("option.max_model_len", "2048", "max_model_len", 2048),
        ("option.dtype", "fp32", "dtype", "fp32"),
        ("option.dtype", "float32", "dtype", "fp32"),
        ("option.dtype", "float16", "dtype", "fp16"),
        ("option.dtype", "BFloat16", "dtype", "bf16"),
        ("option.dtype", "bf16", "dtype", "bf16"),
        ("option.device", "cpu", "device", "cpu"),
        ("option.device", "CUDA", "device", "cuda"),
        ("option.device", "auto", "device", None),
        ("option.tensor_parallel_degree", "4", "tensor_parallel_degree", 4),
        ("option.tensor_parallel_degree", "max", "tensor_parallel_degree", -1),
        ("option.tensor_parallel_degree", "MAX", "tensor_parallel_degree", -1),
        ("option.trust_remote_code", "true", "trust_remote_code", True),
        ("option.trust_remote_code", "TRUE", "trust_remote_code", True),
        ("option.trust_remote_code", "False", "trust_remote_code", False),
        ("option.enable_prefix_caching", "true", "enable_prefix_caching", True),
        ("option.apply_chat_template", "true", "apply_chat_template", True),
        ("option.served_model_name", "my-llama", "served_model_name", "my-llama"),
        ("option.block_size", "1", "block_size", 1),
        ("option.block_size", "1024", "block_size", 1024),
        ("option.max_kv_cache_tokens", "8192", "max_kv_cache_tokens", 8192),
        ("option.gpu_memory_utilization", "1", "gpu_memory_utilization", 1.0),
        ("option.gpu_memory_utilization", "0.5", "gpu_memory_utilization", 0.5),
        ("option.output_formatter", "jsonlines", "output_formatter", "jsonlines"),
        ("option.output_formatter", "SSE", "output_formatter", "sse"),
        ("option.task", "text-generation", "task", "text-generation"),
        ("option.task", "text-embedding", "task", "text-embedding"),
        ("option.task", "feature-extraction", "task", "text-embedding"),
        ("option.predict_timeout", "30", "predict_timeout_s", 30.0),
        ("option.predict_timeout", "2.5", "predict_timeout_s", 2.5),
    ],
)
def test_each_key_sets_its_field(key, value, field, expected):
    config = ServingConfig.from_properties({key: value})
    assert getattr(config, field) == expected
    assert field in config.explicit


def test_values_are_trimmed():
    config = ServingConfig.from_properties({"batch_size": " 4 ", "option.dtype": " fp16\t"})
    assert (config.batch_size, config.dtype) == (4, "fp16")


def test_workers_use_max_when_both_are_set():
    assert ServingConfig.from_properties({"minWorkers": "1", "maxWorkers": "3"}).num_workers == 3


@pytest.mark.parametrize(
    "props, expected",
    [
        ({}, Strategy.PAGED),
        ({"batch_size": "1"}, Strategy.PAGED),
        ({"batch_size": "8"}, Strategy.DYNAMIC),
        ({"batch_size": "8", "option.rolling_batch": "disable"}, Strategy.DYNAMIC),
        ({"batch_size": "8", "option.rolling_batch": "vllm"}, Strategy.DYNAMIC),
        ({"batch_size": "8", "option.paged_attention": "false"}, Strategy.DYNAMIC),
        ({"batch_size": "8", "option.rolling_batch": "lmi-dist", "option.paged_attention": "false"},
         Strategy.DYNAMIC),
        ({"option.rolling_batch": "disable"}, Strategy.DYNAMIC),
        ({"option.rolling_batch": "disable", "batch_size": "1"}, Strategy.DYNAMIC),
        ({"option.rolling_batch": "lmi-dist"}, Strategy.PAGED),
        ({"option.rolling_batch": "vllm"}, Strategy.PAGED),
        ({"option.rolling_batch": "vllm", "option.paged_attention": "true"}, Strategy.PAGED),
        ({"option.rolling_batch": "auto"}, Strategy.PAGED),
        ({"option.rolling_batch": "scheduler"}, Strategy.PAGED),
        ({"option.rolling_batch": "auto", "option.paged_attention": "true"}, Strategy.PAGED),
        ({"option.rolling_batch": "auto", "option.paged_attention": "false"}, Strategy.ROLLING),
        ({"option.rolling_batch": "scheduler", "option.paged_attention": "false"}, Strategy.ROLLING),
        ({"option.paged_attention": "false"}, Strategy.ROLLING),
        ({"option.rolling_batch": "VLLM"}, Strategy.PAGED),
    ],
)
def test_strategy_table(props, expected):
    assert choose_strategy(props) is expected
    assert ServingConfig.from_properties(props).strategy is expected


def test_batch_size_wins_over_rolling_batch_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="djl_like.config"):
        config = ServingConfig.from_properties({"batch_size": "4", "option.rolling_batch": "vllm"})
    assert config.strategy is Strategy.DYNAMIC
    assert any("batch_size wins" in record.getMessage() and "vllm" in record.getMessage()
               for record in caplog.records)


@pytest.mark.parametrize(
    "props", [{"batch_size": "4"}, {"batch_size": "4", "option.rolling_batch": "disable"}])
def test_dynamic_without_rolling_value_does_not_warn(caplog, props):
    with caplog.at_level(logging.WARNING, logger="djl_like.config"):
        ServingConfig.from_properties(props)
    assert [r for r in caplog.records if r.name == "djl_like.config"] == []


@pytest.mark.parametrize("rolling_batch", ["lmi-dist", "vllm"])
def test_paged_engine_without_paged_attention_is_refused(rolling_batch):
    props = {"option.rolling_batch": rolling_batch, "option.paged_attention": "false"}
    with pytest.raises(ConfigError) as error:
        ServingConfig.from_properties(props)
    message = str(error.value)
    assert "option.paged_attention='false'" in message
    assert f"option.rolling_batch='{rolling_batch}'" in message


@pytest.mark.parametrize(
    "props, strategy",
    [
        ({"batch_size": "4"}, "dynamic"),
        ({"option.rolling_batch": "disable"}, "dynamic"),
        ({"option.paged_attention": "false"}, "rolling"),
    ],
)
def test_prefix_caching_outside_paged_is_refused(props, strategy):
    with pytest.raises(ConfigError) as error:
        ServingConfig.from_properties({**props, "option.enable_prefix_caching": "true"})
    message = str(error.value)
    assert "option.enable_prefix_caching='true'" in message
    assert "paged attention" in message and strategy in message


@pytest.mark.parametrize("props", [{}, {"option.rolling_batch": "vllm"}])
def test_prefix_caching_in_paged_is_accepted(props):
    config = ServingConfig.from_properties({**props, "option.enable_prefix_caching": "true"})
    assert config.enable_prefix_caching is True
    assert config.strategy is Strategy.PAGED


def test_prefix_caching_off_is_fine_in_any_strategy():
    config = ServingConfig.from_properties(
        {"batch_size": "4", "option.enable_prefix_caching": "false"})
    assert config.strategy is Strategy.DYNAMIC


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("engine", "DeepSpeed", "choose one of: Python, MPI"),
        ("batch_size", "abc", "expected an integer >= 1"),
        ("batch_size", "0", "expected an integer >= 1"),
        ("batch_size", "4.0", "expected an integer >= 1"),
        ("batch_size", "1_000", "expected an integer >= 1"),
        ("batch_size", "", "expected an integer >= 1"),
        ("max_batch_delay", "-1", "expected an integer >= 0"),
        ("job_queue_size", "0", "expected an integer >= 1"),
        ("minWorkers", "0", "expected an integer >= 1"),
        ("maxWorkers", "many", "expected an integer >= 1"),
        ("port", "0", "expected an integer from 1 to 65535"),
        ("port", "70000", "expected an integer from 1 to 65535"),
        ("max_payload_mb", "0", "expected an integer >= 1"),
        ("option.model_id", "", "expected a non-empty value"),
        ("option.entryPoint", "", "expected a non-empty value"),
        ("option.rolling_batch", "foo",
         "is not supported; choose one of: auto, scheduler, lmi-dist, vllm, disable"),
        ("option.rolling_batch", "trtllm", "choose one of: auto, scheduler, lmi-dist, vllm, disable"),
        ("option.paged_attention", "yes", "expected true or false"),
        ("option.max_rolling_batch_size", "0", "expected an integer >= 1"),
        ("option.max_rolling_batch_prefill_tokens", "-5", "expected an integer >= 1"),
        ("option.max_model_len", "4k", "expected an integer >= 1"),
        ("option.dtype", "int8", "choose one of: auto, fp32, fp16, bf16"),
        ("option.device", "tpu", "choose one of: auto, cpu, cuda"),
        ("option.tensor_parallel_degree", "0", "expected max or an integer >= 1"),
        ("option.tensor_parallel_degree", "all", "expected max or an integer >= 1"),
        ("option.trust_remote_code", "1", "expected true or false"),
        ("option.enable_prefix_caching", "on", "expected true or false"),
        ("option.enable_chunked_prefill", "maybe", "expected true or false"),
        ("option.enable_chunked_prefill", "false", "always split a prompt longer than "
         "option.max_rolling_batch_prefill_tokens into chunks"),
        ("option.block_size", "0", "expected an integer from 1 to 1024"),
        ("option.block_size", "2048", "expected an integer from 1 to 1024"),
        ("option.max_kv_cache_tokens", "0", "expected an integer >= 1"),
        ("option.gpu_memory_utilization", "0", "expected a number > 0 and <= 1"),
        ("option.gpu_memory_utilization", "1.5", "expected a number > 0 and <= 1"),
        ("option.gpu_memory_utilization", "nan", "expected a number > 0 and <= 1"),
        ("option.gpu_memory_utilization", "most", "expected a number > 0 and <= 1"),
        ("option.output_formatter", "xml", "choose one of: json, jsonlines, sse"),
        ("option.task", "image-classification", "choose one of: text-generation, text-embedding"),
        ("option.predict_timeout", "0", "expected a number > 0"),
        ("option.predict_timeout", "inf", "expected a number > 0"),
    ],
)
def test_invalid_values_name_key_value_and_what_is_allowed(key, value, allowed):
    with pytest.raises(ConfigError) as error:
        ServingConfig.from_properties({key: value})
    message = str(error.value)
    assert f"{key}={value!r}" in message
    assert allowed in message


def test_min_workers_above_max_workers_is_refused():
    with pytest.raises(ConfigError, match=r"minWorkers='4' is greater than maxWorkers='2'"):
        ServingConfig.from_properties({"minWorkers": "4", "maxWorkers": "2"})


def test_invalid_rolling_batch_is_refused_even_when_batch_size_wins():
    with pytest.raises(ConfigError, match=r"option.rolling_batch='foo'"):
        ServingConfig.from_properties({"batch_size": "4", "option.rolling_batch": "foo"})


def test_unknown_keys_are_kept_and_warned_once(caplog):
    props = {
        "option.enable_lora": "true",
        "option.entrypoint": "model.py",
        "option.hf_token": "secret-token",
        "batch_size": "1",
    }
    with caplog.at_level(logging.WARNING, logger="djl_like.config"):
        config = ServingConfig.from_properties(props)
    assert dict(config.unknown) == {
        "option.enable_lora": "true", "option.entrypoint": "model.py", "option.hf_token": "secret-token"}
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "option.enable_lora" in message and "option.hf_token" in message
    assert "did you mean option.entryPoint?" in message
    assert "secret-token" not in message  # values of unknown keys may be credentials
    assert "batch_size" not in message


def test_explicit_names_only_fields_the_user_set():
    config = ServingConfig.from_properties(
        {"option.rolling_batch": "auto", "maxWorkers": "2", "option.dtype": "fp16"})
    assert config.explicit == frozenset({"strategy", "num_workers", "dtype"})


def test_config_is_frozen_hashable_and_picklable():
    config = ServingConfig.from_properties({"option.enable_lora": "true", "batch_size": "2"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 4
    with pytest.raises(TypeError):
        config.unknown["option.enable_lora"] = "false"
    assert hash(config) == hash(ServingConfig.from_properties(
        {"option.enable_lora": "true", "batch_size": "2"}))
    assert pickle.loads(pickle.dumps(config)) == config  # spawned workers receive the config
    assert copy.deepcopy(config) == config
    assert dataclasses.asdict(config)["unknown"] == {"option.enable_lora": "true"}


def test_hand_built_config_is_normalised():
    config = ServingConfig(strategy="rolling", unknown={"a": "b"}, explicit={"batch_size"})
    assert config.strategy is Strategy.ROLLING
    assert hash(config) == hash(ServingConfig(
        strategy=Strategy.ROLLING, unknown={"a": "b"}, explicit=frozenset({"batch_size"})))


def test_load_config_reads_folder_and_environment(tmp_path):
    (tmp_path / "serving.properties").write_text(
        "# Llama on one GPU\n"
        "engine=Python\n"
        "option.rolling_batch=auto\n"
        "option.paged_attention=false\n"
        "option.max_rolling_batch_size: 8\n"
    )
    env = {"MAX_BATCH_SIZE": "64", "OPTION_DTYPE": "float16", "HF_MODEL_ID": "/models/llama"}
    config = load_config(str(tmp_path), env)
    assert config.model_dir == str(tmp_path)
    assert config.strategy is Strategy.ROLLING
    assert config.max_rolling_batch_size == 8  # the file beats the TGI alias
    assert config.dtype == "fp16"
    assert config.model_id == "/models/llama"


def test_load_config_without_properties_file_uses_environment(tmp_path):
    env = {"SERVING_BATCH_SIZE": "4", "SERVING_MAX_BATCH_DELAY": "50", "SAGEMAKER_BIND_TO_PORT": "9000"}
    config = load_config(tmp_path, env)
    assert (config.strategy, config.batch_size, config.max_batch_delay_ms, config.port) == (
        Strategy.DYNAMIC, 4, 50, 9000)


def test_load_config_reports_invalid_environment_value(tmp_path):
    with pytest.raises(ConfigError, match=r"option.rolling_batch='foo'"):
        load_config(tmp_path, {"OPTION_ROLLING_BATCH": "foo"})


def test_config_imports_without_torch():
    code = ("import sys, djl_like.config, djl_like.properties; "
            "bad = [m for m in ('torch', 'transformers', 'batching', 'container') if m in sys.modules]; "
            "sys.exit(str(bad) if bad else 0)")
    repo_root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_root)
    assert result.returncode == 0, result.stderr


def test_max_idle_time_is_kept_as_an_unused_key_with_a_warning(caplog):
    # Workers are a fixed number of model copies here, never scaled down when idle: the LMI key
    # is carried over without error, and the warning says it does nothing.
    with caplog.at_level(logging.WARNING, logger="djl_like.config"):
        config = ServingConfig.from_properties({"max_idle_time": "30"})
    assert dict(config.unknown) == {"max_idle_time": "30"}
    assert "max_idle_time" in caplog.records[0].getMessage()
    assert not hasattr(config, "max_idle_time_s")


def test_enable_chunked_prefill_true_is_accepted_and_false_refused():
    assert "option.enable_chunked_prefill" not in ServingConfig.from_properties(
        {"option.enable_chunked_prefill": "true"}).unknown
    with pytest.raises(ConfigError, match=r"option.enable_chunked_prefill='false' is not supported"):
        ServingConfig.from_properties({"option.enable_chunked_prefill": "false"})


@pytest.mark.parametrize("properties, model_path, expected", [
    ({"option.served_model_name": "chat-model"}, "/opt/ml/model", "chat-model"),
    ({}, "/opt/ml/model/", "model"),
    ({"option.model_id": "/models/Llama-3-8B"}, "/models/Llama-3-8B", "Llama-3-8B"),
    ({"option.model_id": "s3://bucket/prefix/llama/"}, "/tmp/cache/abc", "llama"),
    ({"option.model_id": "org/tiny"}, "/root/.cache/hf/snapshots/123", "tiny"),
])
def test_served_model_name_defaults_to_the_model_folders_name(properties, model_path, expected):
    config = ServingConfig.from_properties(properties, model_dir="/opt/ml/model")
    assert served_model_name(config, model_path) == expected

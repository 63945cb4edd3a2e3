"""serving.properties parsing and the environment-variable mapping of the LMI contract."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from djl_like.errors import ConfigError
from djl_like.properties import (
    load_properties,
    merge_properties,
    parse_properties,
    properties_from_environment,
    read_properties,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", {}),
        ("# comment\n! also a comment\n\n   \n", {}),
        ("  # indented comment\nkey=value", {"key": "value"}),
        ("engine=Python", {"engine": "Python"}),
        ("option.dtype: fp16", {"option.dtype": "fp16"}),
        ("option.dtype fp16", {"option.dtype": "fp16"}),
        ("  batch_size \t=\t 4  ", {"batch_size": "4"}),
        ("option.model_id=s3://bucket/llama:v1", {"option.model_id": "s3://bucket/llama:v1"}),
        ("option.model_id: org/model=a", {"option.model_id": "org/model=a"}),
        ("option.entryPoint=model.py # not a comment", {"option.entryPoint": "model.py # not a comment"}),
        ("batch_size=2\nbatch_size=8", {"batch_size": "8"}),
        ("option.revision=", {"option.revision": ""}),
        ("option.revision", {"option.revision": ""}),
        ("a=1\r\nb=2\rc=3\n", {"a": "1", "b": "2", "c": "3"}),
        ("\ufeffengine=MPI", {"engine": "MPI"}),
        ("=orphan value\nkey=1", {"key": "1"}),
    ],
)
def test_parse_properties(text, expected):
    assert parse_properties(text) == expected


_KEYS = st.from_regex(r"[A-Za-z][A-Za-z0-9._-]{0,20}", fullmatch=True)
_VALUES = st.from_regex(r"([!-~]([ !-~]{0,20}[!-~])?)?", fullmatch=True)


@given(st.dictionaries(_KEYS, _VALUES, max_size=8))
def test_written_properties_read_back(props):
    text = "\n".join(f"{key} = {value}" for key, value in props.items())
    assert parse_properties(text) == props


def test_read_properties_without_file_is_empty(tmp_path):
    assert read_properties(tmp_path) == {}
    assert read_properties(tmp_path / "missing") == {}


def test_read_properties_reads_serving_properties(tmp_path):
    (tmp_path / "serving.properties").write_text("# LMI\noption.rolling_batch=vllm\n")
    assert read_properties(str(tmp_path)) == {"option.rolling_batch": "vllm"}


def test_read_properties_refuses_non_utf8(tmp_path):
    (tmp_path / "serving.properties").write_bytes(b"option.model_id=\xff\xfe\n")
    with pytest.raises(ConfigError, match="serving.properties"):
        read_properties(tmp_path)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"OPTION_ROLLING_BATCH": "vllm"}, {"option.rolling_batch": "vllm"}),
        ({"OPTION_entryPoint": "model.py"}, {"option.entryPoint": "model.py"}),
        ({"OPTION_ENTRYPOINT": "model.py"}, {"option.entryPoint": "model.py"}),
        ({"OPTION_ENGINE": "MPI"}, {"engine": "MPI"}),
        ({"OPTION_max_model_len": "512"}, {"option.max_model_len": "512"}),
        ({"SERVING_BATCH_SIZE": "8"}, {"batch_size": "8"}),
        ({"SERVING_MAX_BATCH_DELAY": "50"}, {"max_batch_delay": "50"}),
        ({"SERVING_JOB_QUEUE_SIZE": "10"}, {"job_queue_size": "10"}),
        ({"SERVING_MIN_WORKERS": "2"}, {"minWorkers": "2"}),
        ({"SERVING_MAX_WORKERS": "3"}, {"maxWorkers": "3"}),
        ({"SERVING_MAX_IDLE_TIME": "30"}, {"max_idle_time": "30"}),
        ({"SERVING_maxWorkers": "3"}, {"maxWorkers": "3"}),
        ({"HF_MODEL_ID": "s3://bucket/model"}, {"option.model_id": "s3://bucket/model"}),
        ({"HF_REVISION": "main"}, {"option.revision": "main"}),
        ({"HF_TASK": "text-embedding"}, {"option.task": "text-embedding"}),
        ({"HF_MODEL_TRUST_REMOTE_CODE": "true"}, {"option.trust_remote_code": "true"}),
        ({"MAX_BATCH_SIZE": "64"}, {"option.max_rolling_batch_size": "64"}),
        ({"MAX_CONCURRENT_REQUESTS": "128"}, {"job_queue_size": "128"}),
        ({"MAX_BATCH_PREFILL_TOKENS": "2048"}, {"option.max_rolling_batch_prefill_tokens": "2048"}),
        ({"TENSOR_PARALLEL_DEGREE": "2"}, {"option.tensor_parallel_degree": "2"}),
        ({"SM_NUM_GPUS": "4"}, {"option.tensor_parallel_degree": "4"}),
        ({"SAGEMAKER_BIND_TO_PORT": "9090"}, {"port": "9090"}),
        ({"SAGEMAKER_MODEL_SERVER_WORKERS": "2"}, {"minWorkers": "2", "maxWorkers": "2"}),
        ({"SAGEMAKER_NUM_MODEL_WORKERS": "3"}, {"minWorkers": "3", "maxWorkers": "3"}),
        ({"SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "30"}, {"option.predict_timeout": "30"}),
        ({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "10"}, {"max_payload_mb": "10"}),
        ({"OPTION_DTYPE": " bf16 \n"}, {"option.dtype": "bf16"}),
    ],
)
def test_environment_mapping(env, expected):
    assert properties_from_environment(env) == expected


@pytest.mark.parametrize(
    "env",
    [
        {"PATH": "/usr/bin", "HOME": "/root", "OPTIONAL": "x", "SERVING": "x"},
        {"OPTION_": "x", "SERVING_": "x"},
        {"HF_MODEL_ID": "", "OPTION_DTYPE": "  "},  # `docker run -e NAME=`: unset
        {"SERVING_OPTS": "-Xmx1g"},  # DJL's JVM options, not a property
    ],
)
def test_unrelated_or_empty_variables_are_ignored(env):
    assert properties_from_environment(env) == {}


@pytest.mark.parametrize(
    "env, key, expected",
    [
        # The LMI name beats each TGI alias, whatever the order of the environment.
        ({"MAX_BATCH_SIZE": "64", "OPTION_MAX_ROLLING_BATCH_SIZE": "16"},
         "option.max_rolling_batch_size", "16"),
        ({"OPTION_MAX_ROLLING_BATCH_SIZE": "16", "MAX_BATCH_SIZE": "64"},
         "option.max_rolling_batch_size", "16"),
        ({"MAX_CONCURRENT_REQUESTS": "5", "SERVING_JOB_QUEUE_SIZE": "50"}, "job_queue_size", "50"),
        ({"MAX_BATCH_PREFILL_TOKENS": "1", "OPTION_MAX_ROLLING_BATCH_PREFILL_TOKENS": "2"},
         "option.max_rolling_batch_prefill_tokens", "2"),
        ({"TENSOR_PARALLEL_DEGREE": "2", "OPTION_TENSOR_PARALLEL_DEGREE": "1"},
         "option.tensor_parallel_degree", "1"),
        ({"SM_NUM_GPUS": "8", "OPTION_TENSOR_PARALLEL_DEGREE": "max"},
         "option.tensor_parallel_degree", "max"),
        # The user's TP degree beats the instance-wide GPU count.
        ({"SM_NUM_GPUS": "8", "TENSOR_PARALLEL_DEGREE": "2"}, "option.tensor_parallel_degree", "2"),
        ({"HF_MODEL_ID": "org/a", "OPTION_MODEL_ID": "/models/b"}, "option.model_id", "/models/b"),
        ({"SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "30", "OPTION_PREDICT_TIMEOUT": "60"},
         "option.predict_timeout", "60"),
        # Both SageMaker worker variables: the documented SAGEMAKER_MODEL_SERVER_WORKERS wins.
        ({"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "SAGEMAKER_NUM_MODEL_WORKERS": "4"}, "maxWorkers", "2"),
        ({"SAGEMAKER_NUM_MODEL_WORKERS": "4", "SAGEMAKER_MODEL_SERVER_WORKERS": "2"}, "minWorkers", "2"),
        ({"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "SERVING_MAX_WORKERS": "3"}, "maxWorkers", "3"),
        ({"SAGEMAKER_BIND_TO_PORT": "9000", "SERVING_PORT": "9001"}, "port", "9001"),
    ],
)
def test_environment_precedence(env, key, expected):
    assert properties_from_environment(env)[key] == expected


def test_empty_lmi_variable_does_not_hide_alias():
    env = {"OPTION_MAX_ROLLING_BATCH_SIZE": "", "MAX_BATCH_SIZE": "64"}
    assert properties_from_environment(env) == {"option.max_rolling_batch_size": "64"}


def test_merge_file_beats_environment_and_environment_fills_gaps():
    file_props = {"batch_size": "4", "option.dtype": "fp16"}
    env_props = {"batch_size": "8", "option.model_id": "/models/m"}
    merged = merge_properties(file_props, env_props)
    assert merged == {"batch_size": "4", "option.dtype": "fp16", "option.model_id": "/models/m"}
    assert file_props == {"batch_size": "4", "option.dtype": "fp16"}  # inputs left alone
    assert env_props == {"batch_size": "8", "option.model_id": "/models/m"}


def test_load_properties_file_beats_its_variables(tmp_path):
    (tmp_path / "serving.properties").write_text(
        "option.max_rolling_batch_size=16\noption.rolling_batch=scheduler\n")
    env = {
        "MAX_BATCH_SIZE": "64",
        "OPTION_ROLLING_BATCH": "vllm",
        "HF_MODEL_ID": "/models/llama",
        "SAGEMAKER_BIND_TO_PORT": "9000",
    }
    assert load_properties(tmp_path, env) == {
        "option.max_rolling_batch_size": "16",
        "option.rolling_batch": "scheduler",
        "option.model_id": "/models/llama",
        "port": "9000",
    }


def test_load_properties_without_file_uses_environment(tmp_path):
    assert load_properties(tmp_path, {"SERVING_BATCH_SIZE": "2"}) == {"batch_size": "2"}

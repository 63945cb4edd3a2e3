"""lmi-deploy: what it sends to AWS, what it uploads, and how it reads streamed answers.

S3 is a real moto server over HTTP (see tests/s3_server.py). The SageMaker, SageMaker Runtime
and Application Auto Scaling control planes are real boto3 clients under botocore's
``Stubber`` (or, for the response stream, a ``before-send`` hook answering with real
event-stream bytes): no SageMaker endpoint can run here, and moto's SageMaker support records
resources but does not run containers, so the stub is as close as this machine gets. Stubber
still validates every request against the service model, so parameter names and types are
checked against the real API.
"""

from __future__ import annotations

import binascii
import io
import json
import re
import struct
import tarfile
from pathlib import Path

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.response import StreamingBody
from botocore.stub import ANY, Stubber

from container.deploy import ControlPlane, main, pack_model, stream_texts
from container.safe_tar import extract_archive
from tests.s3_server import (REGION, isolate_from_aws, moto_server, s3, s3_env,  # noqa: F401
                             s3_requests)

BUCKET = "artifacts"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/lmi-batching:0.1.0"
ROLE = "arn:aws:iam::123456789012:role/SageMakerExecution"
PROPERTIES = "option.model_id=s3://models/llama/v1\noption.rolling_batch=auto\n" \
             "option.max_rolling_batch_size=64\n"
TIMESTAMPED = r"llama-chat-\d{8}-\d{6}"
ARN = "arn:aws:sagemaker:us-east-1:123456789012:"


class Matches:
    """Equal to any string that fully matches ``pattern`` (for generated names in stubs)."""

    def __init__(self, pattern: str):
        self.pattern = pattern

    def __eq__(self, other) -> bool:
        return isinstance(other, str) and re.fullmatch(self.pattern, other) is not None

    def __repr__(self) -> str:
        return f"Matches({self.pattern!r})"


@pytest.fixture
def properties_file(tmp_path: Path) -> Path:
    path = tmp_path / "serving.properties"
    path.write_text(PROPERTIES)
    return path


def _deploy_argv(properties_file: Path, *extra: str) -> list[str]:
    return ["deploy", "--serving-properties", str(properties_file),
            "--s3-uri", f"s3://{BUCKET}/deploys", "--image-uri", IMAGE, "--role-arn", ROLE,
            "--endpoint-name", "llama-chat", "--env", "HF_TASK=text-generation",
            "--env", "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS=300", *extra]


def _client(service: str):
    return boto3.client(service, region_name=REGION)


# --- dry run -------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, operations", [
    ([], ["PutObject", "CreateModel", "CreateEndpointConfig", "CreateEndpoint"]),
    (["--autoscale-max", "4", "--target-invocations-per-instance", "8"],
     ["PutObject", "CreateModel", "CreateEndpointConfig", "CreateEndpoint", "DescribeEndpoint",
      "RegisterScalableTarget", "PutScalingPolicy"]),
])
def test_dry_run_prints_every_request_and_sends_none(s3, s3_requests, properties_file, capsys,
                                                     extra, operations):
    s3.create_bucket(Bucket=BUCKET)
    s3_requests.requests.clear()

    assert main(_deploy_argv(properties_file, "--dry-run", *extra)) == 0

    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [request["operation"] for request in printed] == operations
    assert {tuple(sorted(request)) for request in printed} <= {
        ("operation", "parameters", "service"), ("note", "operation", "parameters", "service")}
    model = printed[1]["parameters"]
    assert model["PrimaryContainer"]["Image"] == IMAGE
    assert model["PrimaryContainer"]["ModelDataUrl"] == (
        f"s3://{BUCKET}/deploys/{model['ModelName']}/model.tar.gz")
    assert s3_requests.requests == []  # not even the upload
    assert s3.list_objects_v2(Bucket=BUCKET)["KeyCount"] == 0


def test_dry_run_needs_no_credentials(monkeypatch, tmp_path_factory, properties_file, capsys):
    isolate_from_aws(monkeypatch, tmp_path_factory)
    assert main(_deploy_argv(properties_file, "--dry-run")) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4


def test_delete_dry_run_prints_the_plan(capsys):
    assert main(["delete", "--endpoint-name", "llama-chat", "--dry-run"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [request["operation"] for request in printed] == [
        "DescribeEndpoint", "DescribeEndpointConfig", "DescribeScalableTargets",
        "DeregisterScalableTarget", "DeleteEndpoint", "DeleteEndpointConfig", "DeleteModel"]


# --- deploy with S3 for real and the control plane stubbed ---------------------------------


def _stub_deploy(sagemaker: Stubber, autoscaling: Stubber) -> None:
    name = Matches(TIMESTAMPED)
    sagemaker.add_response("create_model", {"ModelArn": ARN + "model/x"}, {
        "ModelName": name, "ExecutionRoleArn": ROLE,
        "PrimaryContainer": {
            "Image": IMAGE,
            "ModelDataUrl": Matches(rf"s3://{BUCKET}/deploys/{TIMESTAMPED}/model\.tar\.gz"),
            "Environment": {"HF_TASK": "text-generation",
                            "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "300"}}})
    config_arn = {"EndpointConfigArn": ARN + "endpoint-config/x"}
    sagemaker.add_response("create_endpoint_config", config_arn, {
        "EndpointConfigName": name,
        "ProductionVariants": [{
            "VariantName": "AllTraffic", "ModelName": name, "InstanceType": "ml.g6.12xlarge",
            "InitialInstanceCount": 2, "ContainerStartupHealthCheckTimeoutInSeconds": 1800,
            "ModelDataDownloadTimeoutInSeconds": 1800}]})
    sagemaker.add_response("create_endpoint", {"EndpointArn": ARN + "endpoint/llama-chat"},
                           {"EndpointName": "llama-chat", "EndpointConfigName": name})
    sagemaker.add_response("describe_endpoint", {
        "EndpointName": "llama-chat", "EndpointArn": ARN + "endpoint/llama-chat",
        "EndpointStatus": "InService",
        "CreationTime": "2026-01-01T00:00:00Z", "LastModifiedTime": "2026-01-01T00:00:00Z"},
        {"EndpointName": "llama-chat"})
    target = {"ServiceNamespace": "sagemaker",
              "ResourceId": "endpoint/llama-chat/variant/AllTraffic",
              "ScalableDimension": "sagemaker:variant:DesiredInstanceCount"}
    autoscaling.add_response("register_scalable_target", {},
                             {**target, "MinCapacity": 2, "MaxCapacity": 6})
    policy_arn = {"PolicyARN": "arn:aws:autoscaling:policy/x", "Alarms": []}
    autoscaling.add_response("put_scaling_policy", policy_arn, {
        **target, "PolicyName": ANY, "PolicyType": "TargetTrackingScaling",
        "TargetTrackingScalingPolicyConfiguration": {
            "TargetValue": 8.0, "ScaleOutCooldown": ANY, "ScaleInCooldown": ANY,
            "PredefinedMetricSpecification": {
                "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}}})


def test_deploy_uploads_model_tar_gz_and_creates_a_scaled_endpoint(s3, properties_file, tmp_path):
    s3.create_bucket(Bucket=BUCKET)
    model_files = tmp_path / "model"
    model_files.mkdir()
    (model_files / "tokenizer.json").write_text("{}")
    sagemaker, autoscaling = _client("sagemaker"), _client("application-autoscaling")
    plane = ControlPlane({"sagemaker": sagemaker, "application-autoscaling": autoscaling})

    with Stubber(sagemaker) as sagemaker_stub, Stubber(autoscaling) as autoscaling_stub:
        _stub_deploy(sagemaker_stub, autoscaling_stub)
        status = main(_deploy_argv(properties_file, "--model-files", str(model_files),
                                   "--instance-type", "ml.g6.12xlarge", "--instance-count", "2",
                                   "--autoscale-max", "6",
                                   "--target-invocations-per-instance", "8"), plane=plane)
        sagemaker_stub.assert_no_pending_responses()
        autoscaling_stub.assert_no_pending_responses()

    assert status == 0
    create_model, create_config = plane.requests[1], plane.requests[2]
    model_name = create_model.parameters["ModelName"]
    assert create_config.parameters["ProductionVariants"][0]["ModelName"] == model_name
    key = f"deploys/{model_name}/model.tar.gz"
    assert create_model.parameters["PrimaryContainer"]["ModelDataUrl"] == f"s3://{BUCKET}/{key}"
    archive = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert tar.getnames() == ["serving.properties", "tokenizer.json"]
        assert tar.extractfile("serving.properties").read().decode() == PROPERTIES


def test_invalid_serving_properties_stop_before_any_request(s3, s3_requests, tmp_path, capsys):
    s3.create_bucket(Bucket=BUCKET)
    s3_requests.requests.clear()
    bad = tmp_path / "serving.properties"
    bad.write_text("option.rolling_batch=sometimes\n")
    plane = ControlPlane()

    assert main(_deploy_argv(bad), plane=plane) == 2

    assert "option.rolling_batch='sometimes' is not supported" in capsys.readouterr().err
    assert plane.requests == [] and s3_requests.requests == []


@pytest.mark.parametrize("extra, message", [
    (["--autoscale-max", "4"], "go together"),
    (["--instance-count", "3", "--autoscale-max", "2", "--target-invocations-per-instance", "5"],
     "--autoscale-max=2 is below --instance-count=3"),
    (["--startup-timeout", "7200"], "SageMaker accepts 60 to 3600 seconds"),
    (["--env", "NOT AN ASSIGNMENT"], "is not KEY=VALUE"),
])
def test_bad_deploy_arguments_are_refused(properties_file, capsys, extra, message):
    plane = ControlPlane()
    assert main(_deploy_argv(properties_file, *extra), plane=plane) == 2
    assert message in capsys.readouterr().err
    assert plane.requests == []


def test_missing_credentials_are_reported(moto_server, monkeypatch, tmp_path_factory,
                                          properties_file, capsys):
    isolate_from_aws(monkeypatch, tmp_path_factory)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    assert main(_deploy_argv(properties_file)) == 1
    assert "no AWS credentials" in capsys.readouterr().err


def test_packed_archive_is_accepted_by_the_container_extraction(properties_file, tmp_path):
    model = tmp_path / "model"
    (model / "1_Pooling").mkdir(parents=True)
    (tmp_path / "blob").write_text('{"hidden_size": 8}')
    (model / "config.json").symlink_to(tmp_path / "blob")  # as in a Hugging Face cache
    (model / "1_Pooling" / "config.json").write_text("{}")
    (model / ".git").mkdir()
    (model / ".git" / "HEAD").write_text("ref")

    archive = pack_model(properties_file, str(model), tmp_path / "model.tar.gz")
    target = extract_archive(archive, tmp_path / "extracted")

    assert (target / "config.json").read_text() == '{"hidden_size": 8}'
    assert sorted(str(path.relative_to(target)) for path in target.rglob("*")) == [
        "1_Pooling", "1_Pooling/config.json", "config.json", "serving.properties"]


# --- delete --------------------------------------------------------------------------------


def test_delete_removes_scaling_endpoint_config_and_model_in_order():
    sagemaker, autoscaling = _client("sagemaker"), _client("application-autoscaling")
    plane = ControlPlane({"sagemaker": sagemaker, "application-autoscaling": autoscaling})
    target = {"ServiceNamespace": "sagemaker",
              "ScalableDimension": "sagemaker:variant:DesiredInstanceCount"}
    resource = "endpoint/llama-chat/variant/AllTraffic"
    with Stubber(sagemaker) as sagemaker_stub, Stubber(autoscaling) as autoscaling_stub:
        sagemaker_stub.add_response("describe_endpoint", {
            "EndpointName": "llama-chat", "EndpointArn": ARN + "endpoint/llama-chat",
            "EndpointConfigName": "cfg-1",
            "EndpointStatus": "InService", "CreationTime": "2026-01-01T00:00:00Z",
            "LastModifiedTime": "2026-01-01T00:00:00Z"}, {"EndpointName": "llama-chat"})
        sagemaker_stub.add_response("describe_endpoint_config", {
            "EndpointConfigName": "cfg-1", "EndpointConfigArn": ARN + "endpoint-config/cfg-1",
            "CreationTime": "2026-01-01T00:00:00Z",
            "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": "model-1"}]},
            {"EndpointConfigName": "cfg-1"})
        autoscaling_stub.add_response("describe_scalable_targets", {"ScalableTargets": [{
            **target, "ResourceId": resource, "MinCapacity": 1, "MaxCapacity": 4,
            "RoleARN": ROLE, "CreationTime": "2026-01-01T00:00:00Z"}]},
            {**target, "ResourceIds": [resource]})
        autoscaling_stub.add_response("deregister_scalable_target", {},
                                      {**target, "ResourceId": resource})
        sagemaker_stub.add_response("delete_endpoint", {}, {"EndpointName": "llama-chat"})
        sagemaker_stub.add_response("delete_endpoint_config", {}, {"EndpointConfigName": "cfg-1"})
        sagemaker_stub.add_response("delete_model", {}, {"ModelName": "model-1"})

        assert main(["delete", "--endpoint-name", "llama-chat"], plane=plane) == 0
        sagemaker_stub.assert_no_pending_responses()
        autoscaling_stub.assert_no_pending_responses()

    assert [request.operation for request in plane.requests] == [
        "DescribeEndpoint", "DescribeEndpointConfig", "DescribeScalableTargets",
        "DeregisterScalableTarget", "DeleteEndpoint", "DeleteEndpointConfig", "DeleteModel"]


def test_a_failed_aws_call_is_reported_with_its_cause(capsys):
    sagemaker = _client("sagemaker")
    with Stubber(sagemaker) as stub:
        stub.add_client_error("describe_endpoint", "ValidationException",
                              "Could not find endpoint llama-chat.")
        status = main(["delete", "--endpoint-name", "llama-chat"],
                      plane=ControlPlane({"sagemaker": sagemaker}))
    assert status == 1
    assert "Could not find endpoint llama-chat." in capsys.readouterr().err


# --- invoke --------------------------------------------------------------------------------


def _parts(*chunks: bytes) -> list[dict]:
    return [{"PayloadPart": {"Bytes": chunk}} for chunk in chunks]


def test_stream_lines_split_across_events_are_reassembled():
    lines = [{"token": {"id": 1, "text": "Hé"}}, {"token": {"id": 2, "text": "llo 世界"}},
             {"token": {"id": 3, "text": "!"}, "generated_text": "Héllo 世界!"}]
    payload = b"".join(json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in lines)
    cut_inside_a_character = payload.index("世".encode()) + 1
    events = _parts(payload[:5], payload[5:cut_inside_a_character],
                    payload[cut_inside_a_character:-1], payload[-1:])

    assert list(stream_texts(events)) == ["Hé", "llo 世界", "!"]


def test_stream_texts_are_yielded_as_soon_as_their_line_is_complete():
    consumed = []

    def events():
        for chunk in (b'{"token": {"text": "a"}}\n{"tok', b'en": {"text": "b"}}\n'):
            consumed.append(chunk)
            yield {"PayloadPart": {"Bytes": chunk}}

    texts = stream_texts(events())
    assert next(texts) == "a"
    assert len(consumed) == 1
    assert list(texts) == ["b"]


def test_stream_understands_sse_chat_chunks_and_a_last_line_without_newline():
    events = _parts(b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n',
                    b'data: {"choices": [{"delta": {"content": " there"}}]}\n\ndata: [DONE]')
    assert "".join(stream_texts(events)) == "Hi there"


def test_an_error_line_in_the_stream_is_raised_with_its_message():
    events = _parts(b'{"token": {"text": "a"}}\n',
                    b'{"code": 424, "type": "ModelError", "message": "CUDA error"}\n')
    texts = stream_texts(events)
    assert next(texts) == "a"
    with pytest.raises(Exception, match="424 ModelError: CUDA error"):
        next(texts)


def _event_message(payload: bytes) -> bytes:
    """One AWS event-stream message carrying a PayloadPart (the wire format)."""
    def header(name: str, value: str) -> bytes:
        return (bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(value))
                + value.encode())

    headers = (header(":event-type", "PayloadPart") + header(":message-type", "event")
               + header(":content-type", "application/octet-stream"))
    prelude = struct.pack(">II", 16 + len(headers) + len(payload), len(headers))
    message = prelude + struct.pack(">I", binascii.crc32(prelude)) + headers + payload
    return message + struct.pack(">I", binascii.crc32(message))


class _RawStream:
    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks

    def stream(self, **_):
        yield from self.chunks

    def close(self) -> None:
        pass


def test_invoke_stream_prints_tokens_from_a_real_event_stream(s3_env, capsys):
    wire = (_event_message(b'{"token": {"text": "Par"}}\n{"token": {"te')
            + _event_message(b'xt": "is"}, "generated_text": "Paris"}\n'))
    sent = []

    def answer(request, **_):
        sent.append(json.loads(request.body))
        # Network reads cut the bytes anywhere, even inside an event's header.
        return AWSResponse(request.url, 200, {"Content-Type": "application/vnd.amazon.eventstream"},
                           _RawStream([wire[:9], wire[9:70], wire[70:]]))

    runtime = _client("sagemaker-runtime")
    runtime.meta.events.register("before-send.sagemaker-runtime", answer)
    status = main(["invoke", "--endpoint-name", "llama-chat",
                   "--prompt", "The capital of France is",
                   "--max-new-tokens", "8", "--stream"],
                  plane=ControlPlane({"sagemaker-runtime": runtime}))

    assert status == 0
    assert capsys.readouterr().out == "Paris\n"
    assert sent == [{"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8},
                     "stream": True}]


def test_invoke_prints_the_json_answer(capsys):
    runtime = _client("sagemaker-runtime")
    answer = b'{"generated_text": " Paris."}'
    with Stubber(runtime) as stub:
        stub.add_response("invoke_endpoint", {
            "Body": StreamingBody(io.BytesIO(answer), len(answer)),
            "ContentType": "application/json"}, {
            "EndpointName": "llama-chat", "ContentType": "application/json",
            "Accept": "application/json",
            "Body": b'{"inputs": "Hi", "parameters": {"do_sample": false}}'})
        status = main(["invoke", "--endpoint-name", "llama-chat",
                       "--body", '{"inputs": "Hi", "parameters": {"do_sample": false}}'],
                      plane=ControlPlane({"sagemaker-runtime": runtime}))
    assert status == 0
    assert json.loads(capsys.readouterr().out) == {"generated_text": " Paris."}

"""``lmi-deploy``: put this container behind a SageMaker endpoint, invoke it, delete it.

``deploy`` packs ``serving.properties`` (and optionally model files) into ``model.tar.gz``,
uploads it to S3, then creates a SageMaker model (image + ModelDataUrl + environment), an
endpoint config (one ``AllTraffic`` variant with startup timeouts sized for LLMs) and the
endpoint; optionally waits for it and attaches target-tracking auto scaling. ``invoke`` sends
one request (``--stream`` prints tokens as they arrive); ``delete`` removes what deploy made.

The control plane is boto3 (a core dependency), not the sagemaker SDK: v3 of the SDK no longer
has the v2 ``sagemaker.Model``/``Session`` classes, and its ``sagemaker.core.resources``
classes send requests as they are built, which ``--dry-run`` could not show. Every AWS request
goes through one ``ControlPlane``; ``DryRunControlPlane`` prints the requests as JSON lines on
stdout instead of sending them, and tests hand ``ControlPlane`` stubbed boto3 clients.
Human-readable progress goes to stderr, so stdout stays machine-readable.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from botocore.exceptions import (BotoCoreError, ClientError, NoCredentialsError, NoRegionError,
                                 WaiterError)

from djl_like.config import ServingConfig
from djl_like.errors import ConfigError
from djl_like.properties import (PROPERTIES_FILE, merge_properties, parse_properties,
                                 properties_from_environment)

from container.model_store import ARCHIVE_NAME, S3Location

logger = logging.getLogger("lmi-deploy")

VARIANT_NAME = "AllTraffic"
DEFAULT_INSTANCE_TYPE = "ml.g5.2xlarge"
# NOTE: an LLM container downloads gigabytes and loads them before /ping says 200; SageMaker's
# own defaults are sized for small models. 3600 s is the most the API accepts.
DEFAULT_STARTUP_TIMEOUT_S = 1800
DEFAULT_DOWNLOAD_TIMEOUT_S = 1800
MAX_TIMEOUT_S = 3600
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
SCALING_METRIC = "SageMakerVariantInvocationsPerInstance"
# Scale out fast when traffic rises, scale in slowly: a new LLM instance takes minutes to load.
SCALE_OUT_COOLDOWN_S = 60
SCALE_IN_COOLDOWN_S = 600
WAIT_DELAY_S = 30
WAIT_MAX_ATTEMPTS = 120  # 1 hour
_RESOURCE_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class DeployError(Exception):
    """A step that cannot go on; ``main`` prints the message and exits with status 1."""


# --- the control plane -----------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One AWS API request: the service, the operation as named in the API reference, the
    parameters, and a note when it is not sent exactly once (polling, multipart upload)."""

    service: str
    operation: str
    parameters: Mapping[str, Any]
    note: str = ""

    def to_json(self) -> str:
        record = {"service": self.service, "operation": self.operation,
                  "parameters": self.parameters}
        if self.note:
            record["note"] = self.note
        return json.dumps(record, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


class ControlPlane:
    """Sends every AWS request of this tool and records it in ``requests``.

    One boto3 client per service, created on first use from the default credential chain
    (``region`` or the environment's). ``clients`` supplies ready-made clients by service name
    (``sagemaker``, ``sagemaker-runtime``, ``application-autoscaling``, ``s3``).
    """

    def __init__(self, clients: Mapping[str, Any] | None = None, region: str | None = None):
        self._clients = dict(clients or {})
        self._region = region
        self.requests: list[Request] = []

    def client(self, service: str) -> Any:
        """The boto3 client for ``service`` (made on first use)."""
        if service not in self._clients:
            import boto3

            self._clients[service] = boto3.session.Session(region_name=self._region).client(service)
        return self._clients[service]

    def call(self, service: str, operation: str, **parameters: Any) -> dict:
        """Send ``operation`` (e.g. ``CreateModel``) to ``service``; return the response."""
        from botocore import xform_name

        self.requests.append(Request(service, operation, parameters))
        return getattr(self.client(service), xform_name(operation))(**parameters)

    def upload_file(self, path: Path, location: S3Location) -> None:
        """Upload a local file to ``location`` (multipart when large), with a progress bar."""
        from tqdm import tqdm

        self.requests.append(_upload_request(path, location))
        with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                  file=sys.stderr, desc=f"uploading {location.uri}") as progress:
            self.client("s3").upload_file(os.fspath(path), location.bucket, location.key,
                                          Callback=progress.update)

    def wait_in_service(self, endpoint_name: str) -> None:
        """Poll until the endpoint is InService; ``DeployError`` with SageMaker's reason if it
        fails or does not come up within an hour."""
        self.requests.append(_wait_request(endpoint_name))
        waiter = self.client("sagemaker").get_waiter("endpoint_in_service")
        try:
            waiter.wait(EndpointName=endpoint_name,
                        WaiterConfig={"Delay": WAIT_DELAY_S, "MaxAttempts": WAIT_MAX_ATTEMPTS})
        except WaiterError as error:
            reason = error.last_response.get("FailureReason", error.last_response.get(
                "EndpointStatus", "no status"))
            raise DeployError(
                f"endpoint {endpoint_name} did not come into service: {reason}; the "
                f"container's log is in CloudWatch, log group /aws/sagemaker/Endpoints/"
                f"{endpoint_name}") from error


def _upload_request(path: Path, location: S3Location) -> Request:
    body = f"<{path.name}, {path.stat().st_size} bytes>"
    return Request("s3", "PutObject", {"Bucket": location.bucket, "Key": location.key,
                                       "Body": body},
                   note="a multipart upload when the file is large")


def _wait_request(endpoint_name: str) -> Request:
    return Request("sagemaker", "DescribeEndpoint", {"EndpointName": endpoint_name},
                   note=f"every {WAIT_DELAY_S} s until EndpointStatus is InService")


# Answers a dry run gives to the requests whose responses later requests depend on.
_DRY_RUN_RESPONSES: dict[str, dict] = {
    "DescribeEndpoint": {"EndpointConfigName": "<EndpointConfigName of the endpoint>"},
    "DescribeEndpointConfig": {
        "ProductionVariants": [{"ModelName": "<ModelName of each variant>"}]},
    "DescribeScalableTargets": {"ScalableTargets": [{"ResourceId": "<if registered>"}]},
}


class DryRunControlPlane(ControlPlane):
    """Prints each request as one JSON line on ``out`` and sends nothing: no client is made,
    no credentials are needed, nothing is uploaded."""

    def __init__(self, out: TextIO):
        super().__init__()
        self._out = out

    def client(self, service: str) -> Any:
        raise AssertionError(f"a dry run must not create a {service} client")

    def call(self, service: str, operation: str, **parameters: Any) -> dict:
        self._print(Request(service, operation, parameters))
        return _DRY_RUN_RESPONSES.get(operation, {})

    def upload_file(self, path: Path, location: S3Location) -> None:
        self._print(_upload_request(path, location))

    def wait_in_service(self, endpoint_name: str) -> None:
        self._print(_wait_request(endpoint_name))

    def _print(self, request: Request) -> None:
        self.requests.append(request)
        print(request.to_json(), file=self._out, flush=True)


# --- deploy --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """The names of what ``deploy`` creates. Model and endpoint config carry a UTC timestamp,
    so a redeploy never collides with the resources the running endpoint still uses."""

    endpoint_name: str
    model_name: str
    endpoint_config_name: str

    @classmethod
    def named(cls, endpoint_name: str, now: datetime.datetime) -> Deployment:
        _check_resource_name(endpoint_name)
        stamp = now.strftime("%Y%m%d-%H%M%S")
        base = endpoint_name[: 62 - len(stamp)].rstrip("-")
        return cls(endpoint_name, f"{base}-{stamp}", f"{base}-{stamp}")


def scaling_resource_id(endpoint_name: str) -> str:
    """Application Auto Scaling's id for the endpoint's one variant."""
    return f"endpoint/{endpoint_name}/variant/{VARIANT_NAME}"


def _check_resource_name(name: str) -> None:
    if not _RESOURCE_NAME.fullmatch(name):
        raise ConfigError(f"endpoint name {name!r} is not valid: up to 63 letters, digits and "
                          "hyphens, starting and ending with a letter or digit")


def run_deploy(args: argparse.Namespace, plane: ControlPlane) -> int:
    """The ``deploy`` subcommand: package, upload, create model, config and endpoint."""
    environment = parse_environment(args.env)
    properties = Path(args.serving_properties)
    check_serving_properties(properties, environment)
    _check_deploy_arguments(args)
    deployment = Deployment.named(args.endpoint_name, datetime.datetime.now(datetime.timezone.utc))
    location = archive_location(args.s3_uri, deployment.model_name)
    with tempfile.TemporaryDirectory(prefix="lmi-deploy-") as folder:
        archive = pack_model(properties, args.model_files, Path(folder) / ARCHIVE_NAME)
        plane.upload_file(archive, location)
    create_endpoint(plane, deployment, args, location.uri, environment)
    if args.wait or args.autoscale_max:
        logger.info("waiting for %s to be InService (LLM endpoints take 5 to 20 minutes)",
                    deployment.endpoint_name)
        plane.wait_in_service(deployment.endpoint_name)
    if args.autoscale_max:
        attach_autoscaling(plane, deployment.endpoint_name, args.instance_count,
                           args.autoscale_max, args.target_invocations_per_instance)
    logger.info("endpoint %s: model %s, config %s; try: lmi-deploy invoke --endpoint-name %s "
                "--prompt 'Hello'", deployment.endpoint_name, deployment.model_name,
                deployment.endpoint_config_name, deployment.endpoint_name)
    return 0


def parse_environment(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (``--env``) -> a dict; ``ConfigError`` on a malformed one."""
    environment = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or not _VARIABLE_NAME.fullmatch(name):
            raise ConfigError(f"--env {pair!r} is not KEY=VALUE with a valid variable name")
        environment[name] = value
    return environment


def check_serving_properties(path: Path, environment: Mapping[str, str]) -> None:
    """Validate the file as the container will (with the endpoint's environment) before
    anything is uploaded, so a typo fails here and not 15 minutes into endpoint creation;
    warn about variables the file overrides."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read --serving-properties {path}: {error}") from error
    file_properties = parse_properties(text)
    environment_properties = properties_from_environment(environment)
    ServingConfig.from_properties(merge_properties(file_properties, environment_properties))
    for key in sorted(file_properties.keys() & environment_properties.keys()):
        if file_properties[key] != environment_properties[key]:
            logger.warning("--env sets %s=%s, but %s sets %s=%s and the file wins", key,
                           environment_properties[key], path.name, key, file_properties[key])


def _check_deploy_arguments(args: argparse.Namespace) -> None:
    for flag, value in (("--startup-timeout", args.startup_timeout),
                        ("--download-timeout", args.download_timeout)):
        if not 60 <= value <= MAX_TIMEOUT_S:
            raise ConfigError(f"{flag}={value} is out of range; SageMaker accepts 60 to "
                              f"{MAX_TIMEOUT_S} seconds")
    if args.instance_count < 1:
        raise ConfigError(f"--instance-count={args.instance_count} must be at least 1")
    if (args.autoscale_max is None) != (args.target_invocations_per_instance is None):
        raise ConfigError("--autoscale-max and --target-invocations-per-instance go together")
    if args.autoscale_max is not None and args.autoscale_max < args.instance_count:
        raise ConfigError(f"--autoscale-max={args.autoscale_max} is below --instance-count="
                          f"{args.instance_count}")
    target = args.target_invocations_per_instance
    if target is not None and target <= 0:
        raise ConfigError("--target-invocations-per-instance must be greater than 0")


def archive_location(s3_uri: str, model_name: str) -> S3Location:
    """Where model.tar.gz goes: ``s3_uri`` itself when it names a ``.tar.gz`` key, else
    ``<s3_uri>/<model_name>/model.tar.gz``."""
    # NOTE: a fresh key per deployment: overwriting the archive a running endpoint was created
    # from would give its next scaled-out instance a different model than the others.
    location = S3Location.parse(s3_uri)
    if location.key.endswith((".tar.gz", ".tgz")):  # SageMaker expects a gzipped tar
        return location
    return S3Location(location.bucket, f"{location.prefix}{model_name}/{ARCHIVE_NAME}")


def pack_model(serving_properties: Path, model_files: str | None, destination: Path) -> Path:
    """Write ``model.tar.gz``: serving.properties and the files of ``model_files`` at the root.

    Links are stored as the files they point to (a Hugging Face cache snapshot is all links;
    the container refuses links in archives). Hidden files and folders are left out.
    """
    folder = Path(model_files) if model_files else None
    if folder is not None and not folder.is_dir():
        raise ConfigError(f"--model-files {folder} is not a folder")
    if folder is not None and (folder / PROPERTIES_FILE).exists():
        raise ConfigError(f"--model-files {folder} already holds a {PROPERTIES_FILE}; remove "
                          "it or pass that file as --serving-properties")
    # NOTE: compresslevel 1: weights barely compress, and level 9 costs minutes per gigabyte.
    files = _visible_files(folder)
    with tarfile.open(destination, "w:gz", compresslevel=1, dereference=True) as archive:
        archive.add(serving_properties, arcname=PROPERTIES_FILE, filter=_anonymous)
        for path in files:
            archive.add(path, arcname=path.relative_to(folder).as_posix(), filter=_anonymous)
    logger.info("packed %s and %d model files into %s", PROPERTIES_FILE, len(files),
                destination.name)
    return destination


def _visible_files(folder: Path | None) -> list[Path]:
    if folder is None:
        return []
    return sorted(path for path in folder.rglob("*") if path.is_file()
                  and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # The local user and group mean nothing in the container; keep them out of the archive.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def model_request(deployment: Deployment, image_uri: str, model_data_url: str,
                  environment: Mapping[str, str], role_arn: str) -> dict:
    """CreateModel parameters: our image, the uploaded archive, the container environment.

    serving.properties travels inside the archive (SageMaker extracts it to /opt/ml/model),
    where it wins over any variable; ``environment`` is the user's ``--env`` only.
    """
    return {
        "ModelName": deployment.model_name,
        "ExecutionRoleArn": role_arn,
        "PrimaryContainer": {"Image": image_uri, "ModelDataUrl": model_data_url,
                             "Environment": dict(environment)},
    }


def endpoint_config_request(deployment: Deployment, args: argparse.Namespace) -> dict:
    """CreateEndpointConfig parameters: one AllTraffic variant with LLM-sized timeouts."""
    variant = {
        "VariantName": VARIANT_NAME,
        "ModelName": deployment.model_name,
        "InstanceType": args.instance_type,
        "InitialInstanceCount": args.instance_count,
        "ContainerStartupHealthCheckTimeoutInSeconds": args.startup_timeout,
        "ModelDataDownloadTimeoutInSeconds": args.download_timeout,
    }
    if args.inference_ami_version:
        variant["InferenceAmiVersion"] = args.inference_ami_version
    return {"EndpointConfigName": deployment.endpoint_config_name, "ProductionVariants": [variant]}


def create_endpoint(plane: ControlPlane, deployment: Deployment, args: argparse.Namespace,
                    model_data_url: str, environment: Mapping[str, str]) -> None:
    """CreateModel, CreateEndpointConfig, CreateEndpoint (returns at once; creation goes on)."""
    plane.call("sagemaker", "CreateModel", **model_request(
        deployment, args.image_uri, model_data_url, environment, args.role_arn))
    plane.call("sagemaker", "CreateEndpointConfig", **endpoint_config_request(deployment, args))
    plane.call("sagemaker", "CreateEndpoint", EndpointName=deployment.endpoint_name,
               EndpointConfigName=deployment.endpoint_config_name)


def attach_autoscaling(plane: ControlPlane, endpoint_name: str, min_count: int, max_count: int,
                       target_invocations: float) -> None:
    """Register the variant's instance count with Application Auto Scaling and track the
    invocations per instance (the endpoint must be InService first)."""
    target = {"ServiceNamespace": "sagemaker", "ResourceId": scaling_resource_id(endpoint_name),
              "ScalableDimension": SCALABLE_DIMENSION}
    plane.call("application-autoscaling", "RegisterScalableTarget", **target,
               MinCapacity=min_count, MaxCapacity=max_count)
    plane.call("application-autoscaling", "PutScalingPolicy", **target,
               PolicyName=f"{endpoint_name}-invocations-per-instance",
               PolicyType="TargetTrackingScaling",
               TargetTrackingScalingPolicyConfiguration={
                   "TargetValue": float(target_invocations),
                   "PredefinedMetricSpecification": {"PredefinedMetricType": SCALING_METRIC},
                   "ScaleOutCooldown": SCALE_OUT_COOLDOWN_S,
                   "ScaleInCooldown": SCALE_IN_COOLDOWN_S,
               })


# --- invoke --------------------------------------------------------------------------------


def run_invoke(args: argparse.Namespace, plane: ControlPlane, out: TextIO | None = None) -> int:
    """The ``invoke`` subcommand: one request; the answer (or the streamed text) on stdout."""
    out = out or sys.stdout
    body = request_body(args)
    if args.stream:
        response = plane.call("sagemaker-runtime", "InvokeEndpointWithResponseStream",
                              EndpointName=args.endpoint_name, ContentType="application/json",
                              Body=json.dumps(body).encode())
        for text in stream_texts(response.get("Body", [])):
            out.write(text)
            out.flush()
        out.write("\n")
        return 0
    response = plane.call("sagemaker-runtime", "InvokeEndpoint", EndpointName=args.endpoint_name,
                          ContentType="application/json", Accept="application/json",
                          Body=json.dumps(body).encode())
    if "Body" in response:
        out.write(response["Body"].read().decode("utf-8") + "\n")
    return 0


def request_body(args: argparse.Namespace) -> dict:
    """``--body`` (JSON text, or ``@file``) or ``--prompt`` with ``--max-new-tokens``."""
    if args.prompt is not None:
        body: Any = {"inputs": args.prompt, "parameters": {"max_new_tokens": args.max_new_tokens}}
    else:
        text = Path(args.body[1:]).read_text() if args.body.startswith("@") else args.body
        try:
            body = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--body is not valid JSON: {error}") from error
    if args.stream:
        if not isinstance(body, dict):
            raise ConfigError("--stream needs a JSON object body")
        body["stream"] = True
    return body


def stream_objects(events: Iterable[Mapping[str, Any]]) -> Iterator[dict]:
    """The JSON objects of a response stream, whole, however the payload parts split them.

    Parts may end mid-line or even mid-character, so bytes are buffered and only complete
    lines are decoded. Lines may be JSON lines or SSE ``data: {...}`` lines.
    """
    buffer = bytearray()
    for event in events:
        _raise_stream_error(event)
        buffer += event.get("PayloadPart", {}).get("Bytes", b"")
        *lines, rest = bytes(buffer).split(b"\n")
        buffer = bytearray(rest)
        yield from filter(None, map(_parse_line, lines))
    parsed = _parse_line(bytes(buffer))
    if parsed is not None:
        yield parsed


def _raise_stream_error(event: Mapping[str, Any]) -> None:
    for kind in ("ModelStreamError", "InternalStreamFailure"):
        if kind in event:
            raise DeployError(f"the endpoint's stream failed ({kind}): "
                              f"{event[kind].get('Message', event[kind])}")


def _parse_line(line: bytes) -> dict | None:
    text = line.decode("utf-8").strip()
    if text.startswith("data:"):
        text = text[len("data:"):].strip()
    if not text or text == "[DONE]":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DeployError(
            f"the endpoint streamed a line that is not JSON: {text[:200]!r}") from error


def stream_texts(events: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """The generated text of each streamed object, in order (tokens, or chat deltas)."""
    for obj in stream_objects(events):
        if "code" in obj and "message" in obj and "token" not in obj:
            raise DeployError(f"the endpoint answered {obj['code']} {obj.get('type', '')}: "
                              f"{obj['message']}")
        yield _text_of(obj)


def _text_of(obj: Mapping[str, Any]) -> str:
    if isinstance(obj.get("token"), Mapping):
        return obj["token"].get("text") or ""
    choices = obj.get("choices")
    if choices:
        return (choices[0].get("delta") or {}).get("content") or ""
    # A server that did not stream sends one object with the whole text.
    return obj.get("generated_text") or ""


# --- delete --------------------------------------------------------------------------------


def run_delete(args: argparse.Namespace, plane: ControlPlane) -> int:
    """The ``delete`` subcommand: auto scaling, endpoint, endpoint config, model(s)."""
    name = args.endpoint_name
    config_name = plane.call("sagemaker", "DescribeEndpoint", EndpointName=name)[
        "EndpointConfigName"]
    variants = plane.call("sagemaker", "DescribeEndpointConfig",
                          EndpointConfigName=config_name)["ProductionVariants"]
    _detach_autoscaling(plane, name)
    plane.call("sagemaker", "DeleteEndpoint", EndpointName=name)
    plane.call("sagemaker", "DeleteEndpointConfig", EndpointConfigName=config_name)
    for model_name in dict.fromkeys(variant["ModelName"] for variant in variants):
        plane.call("sagemaker", "DeleteModel", ModelName=model_name)
    logger.info("deleted endpoint %s, its config and model; the model.tar.gz in S3 is kept", name)
    return 0


def _detach_autoscaling(plane: ControlPlane, endpoint_name: str) -> None:
    # AWS asks to deregister before deleting the endpoint, or the scaling target lingers.
    target = {"ServiceNamespace": "sagemaker", "ScalableDimension": SCALABLE_DIMENSION}
    resource_id = scaling_resource_id(endpoint_name)
    found = plane.call("application-autoscaling", "DescribeScalableTargets", **target,
                       ResourceIds=[resource_id])["ScalableTargets"]
    if found:
        plane.call("application-autoscaling", "DeregisterScalableTarget", **target,
                   ResourceId=resource_id)


# --- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``lmi-deploy`` argument parser (subcommands deploy, invoke, delete)."""
    parser = argparse.ArgumentParser(
        prog="lmi-deploy",
        description="Deploy this container to a SageMaker endpoint, invoke it, delete it.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_deploy_arguments(commands.add_parser(
        "deploy", help="upload serving.properties (+ model files) and create an endpoint"))
    _add_invoke_arguments(commands.add_parser("invoke", help="send one request to an endpoint"))
    delete = commands.add_parser("delete", help="delete an endpoint, its config and model")
    delete.add_argument("--endpoint-name", required=True)
    delete.set_defaults(run=run_delete)
    for command in commands.choices.values():
        command.add_argument("--region", help="AWS region (default: from the environment)")
        command.add_argument("--dry-run", action="store_true",
                             help="print every AWS request as a JSON line; send none")
    return parser


def _add_deploy_arguments(deploy: argparse.ArgumentParser) -> None:
    deploy.add_argument("--serving-properties", required=True, metavar="FILE")
    deploy.add_argument("--model-files", metavar="DIR",
                        help="files packed next to serving.properties in model.tar.gz")
    deploy.add_argument("--s3-uri", required=True, metavar="s3://BUCKET/PREFIX",
                        help="where model.tar.gz is uploaded")
    deploy.add_argument("--image-uri", required=True, help="this container image in ECR")
    deploy.add_argument("--role-arn", required=True, help="the SageMaker execution role")
    deploy.add_argument("--endpoint-name", required=True)
    deploy.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE)
    deploy.add_argument("--instance-count", type=int, default=1)
    deploy.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="container environment variable (repeatable)")
    deploy.add_argument("--startup-timeout", type=int, default=DEFAULT_STARTUP_TIMEOUT_S,
                        metavar="SECONDS", help="ContainerStartupHealthCheckTimeoutInSeconds")
    deploy.add_argument("--download-timeout", type=int, default=DEFAULT_DOWNLOAD_TIMEOUT_S,
                        metavar="SECONDS", help="ModelDataDownloadTimeoutInSeconds")
    deploy.add_argument("--inference-ami-version", help="e.g. al2-ami-sagemaker-inference-gpu-3-1")
    deploy.add_argument("--autoscale-max", type=int, metavar="N",
                        help="scale between --instance-count and N instances")
    deploy.add_argument("--target-invocations-per-instance", type=float, metavar="X",
                        help="target of the SageMakerVariantInvocationsPerInstance metric")
    deploy.add_argument("--wait", action="store_true", help="return once InService")
    deploy.set_defaults(run=run_deploy)


def _add_invoke_arguments(invoke: argparse.ArgumentParser) -> None:
    invoke.add_argument("--endpoint-name", required=True)
    body = invoke.add_mutually_exclusive_group(required=True)
    body.add_argument("--body", help="the request as JSON text, or @FILE")
    body.add_argument("--prompt", help="text to complete")
    invoke.add_argument("--max-new-tokens", type=int, default=64)
    invoke.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    invoke.set_defaults(run=run_invoke)


def main(argv: Sequence[str] | None = None, plane: ControlPlane | None = None) -> int:
    """Entry point of ``lmi-deploy``; returns the exit status (0 ok, 1 AWS failure, 2 bad
    arguments or configuration). ``plane`` replaces the boto3 control plane."""
    args = build_parser().parse_args(argv)
    prefix = "lmi-deploy (dry run, nothing sent)" if args.dry_run else "lmi-deploy"
    logging.basicConfig(level=logging.INFO, format=f"{prefix}: %(message)s", stream=sys.stderr)
    if plane is None:
        plane = DryRunControlPlane(sys.stdout) if args.dry_run else ControlPlane(region=args.region)
    try:
        return args.run(args, plane)
    except ConfigError as error:
        return _fail(str(error), status=2)
    except DeployError as error:
        return _fail(str(error))
    except (BotoCoreError, ClientError) as error:  # their messages name operation and cause
        return _fail(_aws_error_message(error))


def _aws_error_message(error: Exception) -> str:
    if isinstance(error, NoRegionError):
        return "no AWS region: pass --region or set AWS_DEFAULT_REGION"
    if isinstance(error, NoCredentialsError):
        return "no AWS credentials: set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    return str(error)


def _fail(message: str, status: int = 1) -> int:
    print(f"lmi-deploy: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""A real S3 for tests: moto's server on a free localhost port, spoken to over HTTP.

No in-process mock: the code under test builds ordinary boto3 clients, which find the server
through ``AWS_ENDPOINT_URL_S3`` and dummy credentials in the environment, exactly as they find
AWS in production. Import the fixtures into a test module to use them:

    from tests.s3_server import moto_server, s3, s3_env, s3_requests  # noqa: F401
"""

from __future__ import annotations

import logging
import re
import urllib.request
from collections.abc import Iterator

import pytest

REGION = "us-east-1"
# Variables that could point boto3 at real credentials or another endpoint.
_AWS_VARIABLES = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
)


# werkzeug logs every request the server answers: '"GET /bucket/key HTTP/1.1" 200 -'.
_REQUEST_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/')


class RequestLog(logging.Handler):
    """The requests the server answered, as "METHOD /path?query" strings, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = _REQUEST_LINE.search(record.getMessage())
        if match:
            self.requests.append(f"{match['method']} {match['path']}")

    def object_reads(self) -> list[str]:
        """Paths of the objects downloaded (GET of a key, not listings)."""
        paths = [request.removeprefix("GET ") for request in self.requests
                 if request.startswith("GET ")]
        return [path for path in paths if "?" not in path and path.count("/") >= 2]


_request_log = RequestLog()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """Start moto in server mode once per session; yields its base URL."""
    from moto.server import ThreadedMotoServer

    # The server runs in a thread of this process, so its werkzeug access log is ours to read.
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.addHandler(_request_log)
    if werkzeug.level == logging.NOTSET:
        werkzeug.setLevel(logging.INFO)

    # Port 0: the operating system picks a free port, so parallel runs never collide.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    werkzeug.removeHandler(_request_log)


def isolate_from_aws(monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> None:
    """Remove every way boto3 could find real credentials (files, profiles, instance role)."""
    for variable in _AWS_VARIABLES + ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(variable, raising=False)
    missing = tmp_path_factory.mktemp("no-aws-config") / "absent"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(missing))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)


@pytest.fixture
def s3_env(moto_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> Iterator[str]:
    """Point boto3 at the moto server with dummy credentials; empty S3 after the test."""
    isolate_from_aws(monkeypatch, tmp_path_factory)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    yield moto_server
    request = urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture
def s3_requests(s3_env: str) -> RequestLog:
    """The requests the S3 server answers from now on (to count downloads)."""
    _request_log.requests.clear()
    return _request_log


@pytest.fixture
def s3(s3_env: str):
    """A boto3 S3 client for arranging and checking objects (found through the environment)."""
    import boto3

    return boto3.client("s3")

"""Start ``serve`` as users do (``python -m container.serve``) on a free port, for tests and
benchmarks.

    with start_server(model_dir, {"OPTION_ROLLING_BATCH": "auto"}) as server:
        requests.post(server.url + "/invocations", json={"inputs": "Hi"})
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A running ``serve`` process: ``url``, ``process``, ``logs()``, ``stop()``."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path):
        self.process = process
        self.url = url
        self._log_path = log_path

    def logs(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        return self._log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM (graceful), then SIGKILL of its process group; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # its own group: it and its workers
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def start_server(model_dir: str | os.PathLike[str], env: dict[str, str] | None = None,
                 timeout: float = 120, *, args: tuple[str, ...] = ()) -> Server:
    """Start ``serve --model-dir model_dir`` on a free port and wait until ``/ping`` is 200.

    ``env`` is added to this process's environment. Raises ``RuntimeError`` with the server's
    logs if it exits or is not healthy within ``timeout`` seconds (it is stopped then).
    """
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="lmi-serve-", suffix=".log")[1])
    command = [sys.executable, "-m", "container.serve", "--model-dir", str(model_dir),
               "--port", str(port), "--host", "127.0.0.1", *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=_environment(env), cwd=REPO_ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_healthy(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _environment(extra: dict[str, str] | None) -> dict[str, str]:
    # NOTE: test servers compute in fp32 unless a test says otherwise (its env or its
    # serving.properties, which wins over the variable): the exactness tests hold for fp32, and
    # `auto` is bf16 on CPUs with native bf16, whose results may vary with the batch's shape.
    env = {"OPTION_DTYPE": "fp32", **os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def wait_healthy(server: Server, timeout: float) -> None:
    """Wait until ``/ping`` answers 200; raise ``RuntimeError`` with the logs if the server
    exits, reports itself unhealthy, or is not ready within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"serve exited with status {server.process.returncode}:\n"
                               f"{server.logs()}")
        status, body = _ping(server.url)
        if status == 200:
            return
        if body.get("status") == "unhealthy":  # loading failed or the engine died: no retry
            raise RuntimeError(f"serve is unhealthy: {body.get('message')}\n{server.logs()}")
        time.sleep(0.2)
    raise RuntimeError(f"serve was not healthy within {timeout:g} s:\n{server.logs()}")


def _ping(url: str) -> tuple[int | None, dict]:
    """``/ping``'s status and JSON body; (None, {}) while nothing listens."""
    try:
        with urllib.request.urlopen(url + "/ping", timeout=2) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, _json_or_empty(error.read())
    except OSError:  # not listening yet
        return None, {}


def _json_or_empty(body: bytes) -> dict:
    try:
        parsed = json.loads(body)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}

"""``serve``: the container's entry point (``docker run IMAGE serve``).

The master process reads the configuration and finds the model before anything starts, so a
wrong setting stops the container at once with a message naming the key. It then runs gunicorn:
one worker process per model copy, each loading its own engine in the background (``/ping``
answers 503 until it is ready), with many threads so concurrent requests reach the engine
together and are batched there.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from gunicorn import util as gunicorn_util
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker

from batching.devices import COPY_SLOT_VARIABLE
from djl_like.config import DEFAULT_MODEL_DIR, ServingConfig, load_config
from djl_like.errors import ConfigError

logger = logging.getLogger("container.serve")

DEFAULT_MODEL_MAX_LEN = 2048
# Each request waiting on the engine holds one thread: enough threads for the engine's queue,
# within reason (idle threads cost nothing: the pool creates them on demand).
MIN_THREADS, MAX_THREADS = 64, 1024
# gunicorn kills a worker whose main loop has not checked in for this long. The loop checks in
# every second whatever the requests do; a worker that misses minutes of check-ins is hung.
WORKER_HEARTBEAT_TIMEOUT_S = 300
GRACEFUL_SHUTDOWN_S = 30
# After SIGTERM the worker drains (new requests 503, requests in flight finish) for at most this
# long, then fails what is left with 503 and exits before gunicorn's SIGKILL at the graceful
# timeout: the margin writes those last responses.
DRAIN_TIMEOUT_S = GRACEFUL_SHUTDOWN_S - 5
CONFIG_ERROR_EXIT = 2
# prometheus_client's multi-process mode: each worker writes its metrics to files in this folder
# and /metrics merges them (see container.metrics).
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_OPTIONAL_SETTINGS = frozenset({"control_socket_disable"})
LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"


class ServingApplication(BaseApplication):
    """gunicorn, configured in code: each worker builds its own app (and model copy) on start."""

    def __init__(self, config: ServingConfig, model_path: str, options: dict):
        self.config = config
        self.model_path = model_path
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in _OPTIONAL_SETTINGS and key not in self.cfg.settings:
                continue  # an older gunicorn without this feature needs no setting for it
            self.cfg.set(key, value)

    def load(self):
        """Called in each worker after the fork (no preload): the model loads there."""
        from container.app import create_app  # NOTE: keeps torch out of the master process

        app = create_app(self.config, self.model_path)
        _stop_on_load_failure(app.extensions["lmi_engine_loader"])
        return app


def _stop_on_load_failure(loader) -> None:
    """Stop the whole server, with the reason in one line, when the model cannot be loaded.

    Whatever the cause (a setting only the loaded model can refuse, such as
    ``option.max_model_len`` beyond its positions; a truncated or unreadable weights file; a
    handler that fails to import), a worker without a model would answer ``/ping`` 503 forever
    and the platform would never replace it. gunicorn halts when a worker exits with its
    boot-error status, so ``serve`` exits non-zero.
    """
    def watch() -> None:
        loader.loaded.wait()
        if loader.error is not None:
            print(load_failure_line(loader.error), file=sys.stderr, flush=True)
            os._exit(Arbiter.WORKER_BOOT_ERROR)

    threading.Thread(target=watch, name="load-watch", daemon=True).start()


def load_failure_line(error: BaseException) -> str:
    """The one line ``serve`` prints when the model could not be loaded."""
    if isinstance(error, ConfigError):
        reason = f"invalid configuration: {error}"
    else:
        reason = f"the model could not be loaded: {type(error).__name__}: {error}"
    return "serve: " + " ".join(reason.split())  # NOTE: one line, whatever the message holds


class PromptShutdownThreadWorker(ThreadWorker):
    """gunicorn's gthread worker, with a draining shutdown that ends on time and JSON errors.

    SIGTERM starts the app's ``Drain`` instead of stopping at once: the worker keeps accepting
    connections, so a request arriving during the drain is answered 503 (gunicorn's own stop
    would leave it queued, then reset), and stops once the admitted requests are done or
    ``DRAIN_TIMEOUT_S`` has passed.

    NOTE: after it stops, gunicorn 26's gthread worker waits for socket events for the whole
    graceful timeout in one call and closes expired idle keep-alive connections only after it:
    one idle client (load balancers keep connections open) holds every stop for 30 s. Waiting
    at most a second at a time lets idle connections expire after their keep-alive time.
    """

    _drain_deadline: float | None = None

    def handle_exit(self, sig, frame) -> None:
        drain = self._drain()
        if drain is None or self._drain_deadline is not None:
            super().handle_exit(sig, frame)
            return
        drain.begin()
        self._drain_deadline = time.monotonic() + DRAIN_TIMEOUT_S
        self.cfg.set("keepalive", 0)  # every response from now on closes its connection
        self.method_queue.defer(lambda: None)  # wake the loop

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        super().wait_for_and_dispatch_events(min(timeout, 1.0))
        if self.alive and self._drain_deadline is not None:
            self._check_drain()

    def _check_drain(self) -> None:
        drain = self._drain()
        timed_out = time.monotonic() >= self._drain_deadline
        if drain.num_in_flight and not timed_out:
            return
        if timed_out:
            self.log.warning("drain timeout (%d s): failing %d requests still in flight",
                             DRAIN_TIMEOUT_S, drain.num_in_flight)
        drain.end()
        self.alive = False
        for connection in self.keepalived_conns:
            connection.timeout = 0  # idle keep-alive connections: close at once

    def _drain(self):
        extensions = getattr(getattr(self, "wsgi", None), "extensions", {})
        return extensions.get("lmi_drain")

    def handle_request(self, req, conn):
        from container.app import BROKEN_FRAMING_FLAG  # NOTE: loaded already, in the worker

        keepalive = super().handle_request(req, conn)
        # A body whose framing broke leaves bytes that are no request: close, never parse them.
        return keepalive and not getattr(req.body, BROKEN_FRAMING_FLAG, False)

    def handle_error(self, req, client, addr, exc) -> None:
        """Answer a request gunicorn could not parse in the JSON error shape, not HTML."""
        status, kind = _protocol_error(exc)
        if status == 500:
            self.log.exception("error handling request")
            message = "unexpected error while reading the request"
        else:
            self.log.warning("invalid request from %s: %s", (addr or ("",))[0], exc)
            message = f"{type(exc).__name__}: {exc}"
        body = json.dumps({"code": status, "type": kind, "message": message}).encode()
        head = (f"HTTP/1.1 {status} {kind}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        try:
            gunicorn_util.write_nonblock(client, head.encode("latin-1") + body)
        except Exception:  # noqa: BLE001 - the client may be gone already
            self.log.debug("failed to send the error response")


# gunicorn's parse errors that are not a plain 400, as gunicorn itself answers them (by name:
# older gunicorn versions lack some of them).
_PROTOCOL_ERROR_STATUS = tuple(
    (error_class, status, kind)
    for name, status, kind in (
        ("LimitRequestHeaders", 431, "RequestHeaderFieldsTooLarge"),
        ("ExpectationFailed", 417, "ExpectationFailed"),
        ("UnsupportedTransferCoding", 501, "NotImplemented"),
        ("ForbiddenProxyRequest", 403, "Forbidden"),
        ("ConfigurationProblem", 500, "InternalServerError"),
    )
    if (error_class := getattr(http_errors, name, None)) is not None
)


def _protocol_error(exc: BaseException) -> tuple[int, str]:
    """(status, error type) of an exception gunicorn raised before the app saw the request."""
    for error_class, status, kind in _PROTOCOL_ERROR_STATUS:
        if isinstance(exc, error_class):
            return status, kind
    if isinstance(exc, http_errors.ParseException):
        return 400, "BadRequest"
    return 500, "InternalServerError"


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, check the configuration, find the model and run gunicorn."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        config, model_path = prepare(args.model_dir, os.environ, explicit_dir=args.explicit_dir)
    except ConfigError as error:
        print(f"serve: invalid configuration: {error}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
    port = args.port or config.port
    threads = set_cpu_threads(config, os.environ)
    metrics_dir, made = prepare_metrics_dir(os.environ)
    options = gunicorn_options(config, args.host, port, args.threads, metrics_dir if made else None)
    logger.info("serving %s on %s:%d with %s batching, %d worker(s), %s CPU thread(s) each", model_path,
                args.host, port, config.strategy.value, config.num_workers, threads)
    ServingApplication(config, model_path, options).run()


# Variables the CPU math libraries read when they start (in each worker, which imports torch).
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def set_cpu_threads(config: ServingConfig, env) -> str:
    """Give each model copy its share of the host's cores, before the workers start.

    NOTE: torch's default (every core) in each of several copies, or on a host where other
    processes run, makes OpenMP threads wait for each other: a decode step measured 177 ms on an
    idle 2-core machine and 548 ms with another process on one core. ``option.cpu_threads`` wins;
    else an ``OMP_NUM_THREADS`` the user set is kept; else cores available to this process /
    model copies.
    """
    if config.cpu_threads is None and "OMP_NUM_THREADS" in env:
        return env["OMP_NUM_THREADS"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = str(config.cpu_threads or max(1, cores // config.num_workers))
    for variable in _THREAD_VARIABLES:
        env[variable] = threads
    return threads


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="folder with serving.properties and/or the model "
                        f"(default: $MODEL_DIR, else {DEFAULT_MODEL_DIR})")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (default: SAGEMAKER_BIND_TO_PORT, the "
                        "port key of serving.properties, else 8080)")
    parser.add_argument("--threads", type=int, help="request threads per worker (default: from "
                        f"job_queue_size, between {MIN_THREADS} and {MAX_THREADS})")
    args = parser.parse_args(argv)
    chosen = args.model_dir or os.environ.get("MODEL_DIR")
    args.explicit_dir = chosen is not None
    args.model_dir = chosen or DEFAULT_MODEL_DIR
    return args


def prepare(model_dir: str, env, *, explicit_dir: bool = True) -> tuple[ServingConfig, str]:
    """Load and check the configuration and find the model folder: (config, model path).

    Raises ``ConfigError`` for anything that cannot work. When no model is configured, the
    embedded default model is converted (once) and served with ``max_model_len`` 2048 unless
    the user set it. A model folder the user named must exist; the default one may be absent.
    """
    if explicit_dir and not os.path.isdir(model_dir):
        raise ConfigError(f"model directory {model_dir!r} does not exist or is not a folder")
    config = load_config(model_dir, env)
    model_path = _resolve_model_path(config)
    if model_path is not None:
        return config, model_path
    logger.info("no model configured in %s: serving the default model (SmolLM2-135M-Instruct)",
                model_dir)
    if "max_model_len" not in config.explicit:
        config = dataclasses.replace(config, max_model_len=DEFAULT_MODEL_MAX_LEN)
    if "apply_chat_template" not in config.explicit:
        # NOTE: an instruct model given a bare question ends its turn at once; users of the
        # default model expect `{"inputs": "What is ...?"}` to be answered.
        config = dataclasses.replace(config, apply_chat_template=True)
    return config, _default_model_path()


def _resolve_model_path(config: ServingConfig) -> str | None:
    try:
        from container.model_store import resolve_model_path
    except ImportError:  # NOTE: the model store is optional; a plain local folder needs none
        return _local_model_path(config)
    return resolve_model_path(config)


def _local_model_path(config: ServingConfig) -> str | None:
    """The local-folder rule alone: model_id or the model dir, if it holds config.json."""
    folder = config.model_id or config.model_dir
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    if config.model_id is not None:
        raise ConfigError(f"option.model_id={config.model_id!r} is not a local model folder "
                          "with config.json")
    return None


def _default_model_path() -> str:
    """Convert (once) and locate the default model, in a child process.

    NOTE: the conversion uses torch; doing it in a child keeps torch's thread pools (unsafe
    across fork) and the dequantised weights out of the master that forks the workers.
    """
    child = subprocess.run([sys.executable, "-m", "container.default_model"],
                           stdout=subprocess.PIPE, text=True, check=False)
    if child.returncode != 0:
        raise ConfigError("the default model is not available (see the message above); "
                          "configure a model with option.model_id or the model directory")
    return child.stdout.strip().splitlines()[-1]


def prepare_metrics_dir(env) -> tuple[str, bool]:
    """Give the workers a folder for their metrics files (``PROMETHEUS_MULTIPROC_DIR``): the
    user's, emptied of a previous run's files, or a new temporary one; (folder, whether it is
    new). Set in ``env`` before any worker starts: prometheus_client reads it at import."""
    folder = env.get(METRICS_DIR_ENV)
    if folder:
        os.makedirs(folder, exist_ok=True)
        for stale in glob.glob(os.path.join(folder, "*.db")):
            os.remove(stale)
        return folder, False
    folder = tempfile.mkdtemp(prefix="lmi-metrics-")
    env[METRICS_DIR_ENV] = folder
    return folder, True


def _worker_exited(server, worker) -> None:
    """gunicorn's child_exit hook: a dead worker's gauges leave the sums of /metrics."""
    from prometheus_client import multiprocess  # NOTE: after PROMETHEUS_MULTIPROC_DIR was set

    multiprocess.mark_process_dead(worker.pid)


def _remove_metrics_dir(folder: str):
    def on_exit(server) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    return on_exit


def _assign_copy_slot(server, worker) -> None:
    """In the master, before a worker forks: the lowest model-copy slot no live worker holds, so
    a replaced worker takes over its predecessor's devices (batching.offline.copy_device)."""
    taken = {getattr(other, "lmi_copy_slot", None) for other in server.WORKERS.values()}
    worker.lmi_copy_slot = next(slot for slot in range(len(taken) + 1) if slot not in taken)


def _export_copy_slot(server, worker) -> None:
    os.environ[COPY_SLOT_VARIABLE] = str(worker.lmi_copy_slot)
    logger.info("worker %d serves model copy %d", os.getpid(), worker.lmi_copy_slot)


def gunicorn_options(config: ServingConfig, host: str, port: int, threads: int | None,
                     made_metrics_dir: str | None = None) -> dict:
    """gunicorn settings: threaded workers, one per model copy, no preload, logs to stdio.
    ``made_metrics_dir``: the metrics folder ``serve`` made, removed when gunicorn exits."""
    threads = threads or min(max(config.job_queue_size, MIN_THREADS), MAX_THREADS)
    hooks = {"child_exit": _worker_exited, "pre_fork": _assign_copy_slot, "post_fork": _export_copy_slot}
    if made_metrics_dir is not None:
        hooks["on_exit"] = _remove_metrics_dir(made_metrics_dir)
    return {
        **hooks,
        "bind": f"{host}:{port}",
        "workers": config.num_workers,
        "worker_class": PromptShutdownThreadWorker,
        "threads": threads,
        # Connections beyond the busy threads are idle keep-alive ones, waiting in the poller.
        "worker_connections": 2 * threads,
        "preload_app": False,  # each worker loads its own model copy
        "timeout": WORKER_HEARTBEAT_TIMEOUT_S,
        "graceful_timeout": GRACEFUL_SHUTDOWN_S,
        "keepalive": 5,
        "accesslog": "-",
        "errorlog": "-",
        "loglevel": "info",
        "proc_name": "lmi-serve",
        # NOTE: gunicorn >= 25 opens a control socket at one fixed path per user, which two
        # servers on one machine would fight over; nothing here uses it.
        "control_socket_disable": True,
    }


if __name__ == "__main__":
    main()

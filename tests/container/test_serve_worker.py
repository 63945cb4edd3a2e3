"""The gunicorn worker's drain after SIGTERM, its decision at each tick of its loop: keep
serving while admitted requests run, stop when they are done or when the drain time is up
(failing what is left, so the process exits before gunicorn kills it)."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

from container.serve import DRAIN_TIMEOUT_S, GRACEFUL_SHUTDOWN_S, PromptShutdownThreadWorker


class FakeDrain:
    def __init__(self, num_in_flight: int):
        self.num_in_flight = num_in_flight
        self.ended = False

    def end(self) -> None:
        self.ended = True


def draining_worker(num_in_flight: int, seconds_left: float):
    """A worker past SIGTERM (built without gunicorn's arbiter: only what the drain reads)."""
    worker = object.__new__(PromptShutdownThreadWorker)
    drain = FakeDrain(num_in_flight)
    worker.wsgi = SimpleNamespace(extensions={"lmi_drain": drain})
    worker.alive = True
    worker.log = logging.getLogger("test")
    worker.keepalived_conns = [SimpleNamespace(timeout=time.monotonic() + 5)]
    worker._drain_deadline = time.monotonic() + seconds_left
    return worker, drain


def test_the_drain_ends_before_gunicorns_kill():
    assert 0 < DRAIN_TIMEOUT_S < GRACEFUL_SHUTDOWN_S


def test_requests_in_flight_keep_the_worker_serving():
    worker, drain = draining_worker(num_in_flight=2, seconds_left=10)
    worker._check_drain()
    assert worker.alive and not drain.ended


def test_the_worker_stops_once_the_last_request_is_done():
    worker, drain = draining_worker(num_in_flight=0, seconds_left=10)
    worker._check_drain()
    assert not worker.alive and drain.ended
    assert worker.keepalived_conns[0].timeout == 0  # idle keep-alive connections close now


def test_the_worker_stops_at_the_drain_time_limit_whatever_is_in_flight():
    worker, drain = draining_worker(num_in_flight=3, seconds_left=-0.1)
    worker._check_drain()
    assert not worker.alive and drain.ended  # ended: the engine fails the 3 with 503

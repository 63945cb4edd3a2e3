"""Loading a worker's service (the generation engine, a custom handler, the embedding engine) in
the background.

The contract ``container.serve`` relies on: ``loaded`` is set once loading ended, ``error`` says
why it failed (any failure stops ``serve``), ``ready_engine()`` is what the worker's ``Drain``
shuts down, and ``/ping`` answers 503 while loading, after a failure, or once the service broke.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from djl_like.errors import ConfigError, ServiceUnavailableError

logger = logging.getLogger(__name__)


class Service(Protocol):
    """What a mode's service offers the routes and the loader."""

    error: BaseException | None

    @property
    def is_healthy(self) -> bool: ...

    def start(self) -> "Service": ...

    def shutdown(self) -> None: ...

    def stats(self) -> dict: ...


class ServiceLoader:
    """Holds a worker's service: loading, ready, or failed. Thread-safe to read."""

    def __init__(self, factory: Callable[[], Service], mode: str, description: str, *,
                 healthy: dict | None = None, noun: str = "service"):
        """``healthy``: the ``/ping`` body's extra fields when ready (default the mode);
        ``noun``: what the messages call the service."""
        self._factory = factory
        self.mode = mode
        self.description = description
        self._healthy = healthy if healthy is not None else {"mode": mode}
        self._noun = noun
        self._service: Service | None = None
        self._error: BaseException | None = None
        self.loaded = threading.Event()

    def start(self) -> "ServiceLoader":
        """Start loading in a daemon thread; returns at once."""
        threading.Thread(target=self._load, name=f"{self.mode}-loader", daemon=True).start()
        return self

    def _load(self) -> None:
        started = time.monotonic()
        try:
            self._service = self._factory().start()
            logger.info("%s ready in %.1f s (%s)", self.description, time.monotonic() - started, self.mode)
        except ConfigError as error:  # the message says all; serve stops with it
            logger.error("loading %s failed: %s", self.description, error)
            self._error = error
        except BaseException as error:  # noqa: BLE001 - /ping reports it; the worker stays up
            logger.exception("loading %s failed", self.description)
            self._error = error
        finally:
            self.loaded.set()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def ready_engine(self) -> Service | None:
        """The service once loaded, else None (the name the worker's drain calls)."""
        return self._service

    def service(self) -> Service:
        """The ready service; raises ``ServiceUnavailableError`` (503) while loading or failed."""
        if self._error is not None:
            raise ServiceUnavailableError(self._failure_message())
        if self._service is None:
            raise ServiceUnavailableError("the model is still loading; retry when /ping answers 200")
        if not self._service.is_healthy:
            raise ServiceUnavailableError(self._broken_message())
        return self._service

    def health(self) -> tuple[int, dict]:
        """The ``/ping`` status code and body."""
        if self._error is not None:
            return 503, {"status": "unhealthy", "message": self._failure_message()}
        if self._service is None:
            return 503, {"status": "loading"}
        if not self._service.is_healthy:
            return 503, {"status": "unhealthy", "message": self._broken_message()}
        return 200, {"status": "healthy", **self._healthy}

    def _failure_message(self) -> str:
        return f"loading {self.description} failed: {type(self._error).__name__}: {self._error}"

    def _broken_message(self) -> str:
        error = self._service.error
        if error is None:
            return f"the {self._noun} is not running"
        return f"the {self._noun} stopped: {type(error).__name__}: {error}"

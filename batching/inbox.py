"""The hand-off from request threads to an engine thread (messages and the wake-up), and the
engine thread's life cycle shared by the generation and the embedding engines."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)


class Inbox:
    """``(kind, payload)`` messages posted by any thread, read only by the engine thread."""

    def __init__(self) -> None:
        self._messages: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()

    def post(self, kind: str, payload: Any) -> None:
        self._messages.put((kind, payload))
        self._wakeup.set()

    def wake(self) -> None:
        """Wake the engine thread without a message (to stop it)."""
        self._wakeup.set()

    def wait(self, delay: float | None) -> None:
        """Sleep until a message arrives or ``delay`` s pass (``None``: until a message, checking
        every second; 0: not at all)."""
        if delay == 0.0 or not self._messages.empty():
            return
        self._wakeup.wait(timeout=delay if delay is not None else 1.0)
        self._wakeup.clear()

    def drain(self) -> Iterator[tuple[str, Any]]:
        """The messages posted so far, in order."""
        while True:
            try:
                yield self._messages.get_nowait()
            except queue.Empty:
                return


class EngineThread:
    """The thread of an engine: wait for work, read the inbox, run a step, until stopped.

    A subclass sets ``self.batcher`` and implements ``_drain_inbox()``, ``step()`` and
    ``_on_crash(error)`` (fail what is in flight when the loop itself broke); it may override
    ``_after_step()``. ``thread_name`` names the thread and the crash log line."""

    thread_name = "engine"

    def _init_thread(self) -> None:
        self._inbox = Inbox()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None

    def start(self):
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def _stop_thread(self) -> bool:
        """Ask the loop to stop after its current step and wait for it (10 s at most); True when
        the thread is gone, or was never started."""
        self._stopping = True
        self._inbox.wake()
        if self._thread is None:
            return True
        self._thread.join(timeout=10)
        return not self._thread.is_alive()

    @property
    def is_running(self) -> bool:
        """True when the engine thread drives the steps (``start()`` was called)."""
        return self._thread is not None

    @property
    def is_healthy(self) -> bool:
        if self._stopping or self.error is not None:
            return False
        return self._thread is None or self._thread.is_alive()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wait_for_work()
                self._drain_inbox()
                self.step()
                self._after_step()
        except BaseException as error:  # the loop itself broke: /ping turns 503, requests fail
            logger.exception("%s thread died", self.thread_name)
            self.error = error
            self._on_crash(error)

    def _wait_for_work(self) -> None:
        self._inbox.wait(self.batcher.seconds_until_ready())

    def _after_step(self) -> None:
        pass

    def _drain_inbox(self) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def _on_crash(self, error: BaseException) -> None:
        raise NotImplementedError

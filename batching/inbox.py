"""The hand-off from request threads to an engine thread: messages and the wake-up."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any


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

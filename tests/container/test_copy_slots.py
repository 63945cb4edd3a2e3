"""Each gunicorn worker (model copy) holds a slot, the index of its devices on a GPU host
(batching/devices.py); a worker that dies is replaced in the same slot."""

from __future__ import annotations

import os
import re
import signal
import time

from tests.server import start_server


def _slots(logs: str) -> dict[int, int]:
    return {int(pid): int(slot) for pid, slot in re.findall(r"worker (\d+) serves model copy (\d+)", logs)}


def test_workers_hold_distinct_slots_and_a_replacement_takes_the_freed_one(tiny_llama):
    env = {"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "OPTION_MAX_KV_CACHE_TOKENS": "1024", "OPTION_MAX_MODEL_LEN": "256"}
    with start_server(tiny_llama, env, timeout=180) as server:
        slots = _slots(server.logs())
        assert sorted(slots.values()) == [0, 1]
        victim = next(pid for pid, slot in slots.items() if slot == 1)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_slots(server.logs())) < 3:
            time.sleep(0.5)
        replaced = _slots(server.logs())
        newcomer = set(replaced) - set(slots)
        assert len(newcomer) == 1 and replaced[newcomer.pop()] == 1

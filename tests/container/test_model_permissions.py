"""A model folder whose files the server's user cannot read (mode 0600 from ``save_pretrained`` or
a tarball, owned by someone else) stops ``serve`` at start with the path and the reason, instead
of a misleading "file not found" from transformers and a ``/ping`` that stays 503 forever."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import pytest

from container.model_store import check_readable
from djl_like.errors import ConfigError

NOBODY = 65534


def _run_as_nobody(function, *args):
    """``function(*args)`` in a forked child that dropped to uid/gid 65534 (as the container's
    non-root user would run): returns what it returned or raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                outcome = ("returned", function(*args))
            except Exception as error:  # the outcome is what the test asserts on
                outcome = ("raised", error)
            os.write(write_end, pickle.dumps(outcome))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to fork a child that runs as another user")
def test_an_unreadable_weight_file_is_named_with_the_reason():
    folder = Path(tempfile.mkdtemp())  # under /tmp, outside pytest's root-only tmp folders
    try:
        folder.chmod(0o755)
        (folder / "config.json").write_text("{}")
        (folder / "config.json").chmod(0o644)
        weights = folder / "model.safetensors"
        weights.write_bytes(b"\0" * 16)
        weights.chmod(0o600)  # owned by root: the container's user cannot read it
        kind, outcome = _run_as_nobody(check_readable, folder)
        assert kind == "raised" and isinstance(outcome, ConfigError)
        message = str(outcome)
        assert f"permission denied: cannot read {weights}" in message
        assert "mode 0600" in message and f"as uid {NOBODY}" in message

        weights.chmod(0o644)
        assert _run_as_nobody(check_readable, folder) == ("returned", None)
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()

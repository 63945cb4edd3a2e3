"""Tensor parallelism: one model across N ranks with torch.distributed (gloo on CPU, NCCL on CUDA).

Every rank loads its shard with transformers' own tensor-parallel plan (``tp_plan="auto"``), so
its attention layers see only their share of the heads and the project's attention function
caches only those (each rank's KV cache holds its KV heads; the token capacity is the group's).

Rank 0 is the serving process: it owns the engine, the batcher and the block manager, and
samples. Ranks 1..N-1 are processes it starts (``python -m batching.tensor_parallel``) and
supervises. Each step, rank 0 broadcasts the packed batch as a few tensors; every rank then runs
the same forward, whose collectives (transformers' plan) meet across the group.

A rank that dies breaks the group: rank 0's next step raises ``GroupFailure`` (the engine thread
stops, ``/ping`` turns 503, every request in flight fails with 503), the other ranks are
stopped, and after a short grace period the serving process exits so the platform replaces it.
A rank whose parent (rank 0's process) dies exits at once (a watchdog thread polls its parent
id): no orphans. NOTE: not ``PR_SET_PDEATHSIG``, which fires when the *thread* that started the
child ends, and the serving process loads its model in a short-lived thread.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Commands rank 0 broadcasts in a header tensor.
STEP, ALLOCATE, STOP = 1, 2, 3
_HEADER = 6  # command, num_tokens, num_seqs, max_blocks, num_logits, num_decodes (or blocks, block size)
# Exit status of a serving process whose group broke: gunicorn's worker boot-error status,
# which halts the whole server, so the container exits and the platform replaces it.
EXIT_GROUP_FAILED = 3
FAILURE_GRACE_S = 2.0


class GroupFailure(BaseException):
    """A rank of the tensor-parallel group died. NOTE: a BaseException, not an Exception: the
    engine retries a failed batch request by request (catching Exception), which would hang on
    a broken group; this one stops the engine thread instead."""


@dataclass(frozen=True)
class GroupSpec:
    """What every rank needs to join the group and load its shard."""

    world_size: int
    init_method: str  # tcp://127.0.0.1:PORT, rank 0's rendezvous
    model_path: str
    dtype: str
    device_type: str  # cpu | cuda
    trust_remote_code: bool = False
    revision: str | None = None
    timeout_s: float = 600.0
    first_device: int = 0  # CUDA: rank r computes on GPU first_device + r (batching.devices)

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"

    def device(self, rank: int) -> str:
        return f"cuda:{self.first_device + rank}" if self.device_type == "cuda" else "cpu"


class Group:
    """This process's place in the group: ``rank``, ``world_size``, and the broadcasts."""

    def __init__(self, spec: GroupSpec, rank: int):
        self.spec = spec
        self.rank = rank
        self.world_size = spec.world_size
        if spec.device_type == "cuda":
            torch.cuda.set_device(spec.first_device + rank)
        else:
            # NOTE: N ranks on one host share its cores; more threads than cores thrash.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
        dist.init_process_group(spec.backend, init_method=spec.init_method, rank=rank,
                                world_size=spec.world_size, timeout=timedelta(seconds=spec.timeout_s))

    @property
    def device(self) -> torch.device:
        return torch.device(self.spec.device(self.rank))

    def broadcast_header(self, values: list[int]) -> list[int]:
        header = torch.tensor(values if self.rank == 0 else [0] * _HEADER, dtype=torch.int64, device=self._comm_device)
        dist.broadcast(header, src=0)
        return header.tolist()

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (others pass a buffer of the same shape and dtype)."""
        moved = tensor.to(self._comm_device)
        dist.broadcast(moved, src=0)
        return moved.to(self.device)

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.spec.backend == "nccl" else torch.device("cpu")


class Leader(Group):
    """Rank 0: starts and supervises ranks 1..N-1, and sends them each command."""

    def __init__(self, spec: GroupSpec, on_failure=None):
        self.processes = [_start_rank(spec, rank) for rank in range(1, spec.world_size)]
        self.failure: str | None = None
        self._on_failure = on_failure or _exit_process
        try:
            super().__init__(spec, 0)
        except BaseException:
            self.stop_ranks()
            raise
        self._watcher = threading.Thread(target=self._watch, name="tp-watch", daemon=True)
        self._watcher.start()

    def check(self) -> None:
        if self.failure is not None:
            raise GroupFailure(self.failure)

    def send_step(self, tensors: list[torch.Tensor], header: list[int]) -> None:
        self.check()
        try:
            self.broadcast_header([STEP, *header])
            for tensor in tensors:
                self.broadcast(tensor)
        except RuntimeError as error:  # a peer went away in the middle of the broadcast
            raise GroupFailure(f"tensor-parallel broadcast failed: {error}") from error

    def send_allocate(self, num_blocks: int, block_size: int) -> None:
        self.check()
        self.broadcast_header([ALLOCATE, num_blocks, block_size, 0, 0, 0])

    def close(self) -> None:
        """Stop the ranks (a STOP command, then signals) and leave the group."""
        if self.failure is None and all(process.poll() is None for process in self.processes):
            try:
                self.broadcast_header([STOP, 0, 0, 0, 0, 0])
            except RuntimeError:
                pass
        self.failure = self.failure or "closed"
        self.stop_ranks()
        if dist.is_initialized():
            dist.destroy_process_group()

    def stop_ranks(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _watch(self) -> None:
        while self.failure is None:
            for rank, process in enumerate(self.processes, start=1):
                status = process.poll()
                if status is not None and self.failure is None:
                    self._fail(f"tensor-parallel rank {rank} exited with status {status}")
            time.sleep(0.2)

    def _fail(self, reason: str) -> None:
        logger.error("%s: stopping this model copy", reason)
        self.failure = reason
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        threading.Timer(FAILURE_GRACE_S, self._on_failure, args=(reason,)).start()


def _exit_process(reason: str) -> None:
    print(f"serve: model copy stopped: {reason}", file=sys.stderr, flush=True)
    os._exit(EXIT_GROUP_FAILED)


def start_leader(world_size: int, model_path: str, *, dtype: str, device_type: str,
                 trust_remote_code: bool = False, revision: str | None = None, first_device: int = 0) -> Leader:
    spec = GroupSpec(world_size, f"tcp://127.0.0.1:{_free_port()}", model_path, dtype, device_type,
                     trust_remote_code, revision, first_device=first_device)
    return Leader(spec)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_rank(spec: GroupSpec, rank: int) -> subprocess.Popen:
    fields = {"rank": rank, "parent_pid": os.getpid(), **asdict(spec)}
    return subprocess.Popen([sys.executable, "-m", "batching.tensor_parallel", json.dumps(fields)])


def _exit_with_parent(parent_pid: int) -> None:
    """Watchdog of a rank: exit as soon as rank 0's process is gone (the rank is re-parented)."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(EXIT_GROUP_FAILED)


# ---- ranks 1..N-1 -------------------------------------------------------------------------------
def run_rank(spec: GroupSpec, rank: int) -> None:
    """Join the group, load this rank's shard (running the same load-time probes as rank 0, in
    step with it), then follow rank 0's commands until STOP."""
    from batching.runner import ModelRunner, StepInputs

    group = Group(spec, rank)
    runner = ModelRunner(spec.model_path, dtype=spec.dtype, device=spec.device(rank),
                         trust_remote_code=spec.trust_remote_code, revision=spec.revision, group=group)
    while True:
        command, *header = group.broadcast_header([])
        if command == STOP:
            break
        if command == ALLOCATE:
            runner.allocate_local_kv_cache(header[0], header[1])
        elif command == STEP:
            inputs = StepInputs.receive(group, header, runner)
            runner.forward(inputs, inputs.logits_indices)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s")
    fields = json.loads((argv or sys.argv[1:])[0])
    rank, parent_pid = fields.pop("rank"), fields.pop("parent_pid")
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    run_rank(GroupSpec(**fields), rank)


if __name__ == "__main__":
    main()

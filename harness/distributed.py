"""Process-group setup from the launcher's environment, and the few collectives the loop uses.

torchrun, `accelerate launch` and Slurm's srun (via torchrun) all export RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT. With none of them set the run is a
plain single process and no process group is created. Every collective runs
under the process group's timeout, so a dead rank ends the job instead of
blocking the others forever.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from harness.errors import HarnessError

log = logging.getLogger("harness")

DEFAULT_TIMEOUT_S = 300.0


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_from_main(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.broadcast(tensor, src=0)
        return tensor

    def gather(self, values: list[int]) -> list[list[int]]:
        """Every rank's list of ints (the same length on each), in rank order."""
        mine = torch.tensor(values, dtype=torch.int64, device=self.device)
        if not self.distributed:
            return [mine.tolist()]
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        return [g.tolist() for g in gathered]


class CommunicationError(HarnessError):
    """A collective failed because another rank died, stalled or was cut off: not the
    user's input, so exit status 1, but still one line that says what happened."""

    exit_status = 1


def explain_collective_failure(error: BaseException, rank: int, timeout_s: float) -> CommunicationError | None:
    """One clear error for a collective that failed (gloo and NCCL raise RuntimeErrors
    naming themselves); None for any other error, which keeps its traceback."""
    text = str(error).strip()
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and any(s in text for s in ("gloo", "NCCL", "c10d")))):
        return None
    detail = text.splitlines()[0] if text else type(error).__name__
    if "timed out" in text.lower():
        return CommunicationError(
            f"rank {rank}: no answer from another rank within --timeout {timeout_s:g} s ({detail}); "
            "that rank is stuck or far behind: see its log; the last checkpoint is intact"
        )
    return CommunicationError(
        f"rank {rank}: lost contact with another rank ({detail}); it died or its network failed: "
        "see its log; the last checkpoint is intact"
    )


def digest_ints(text: str) -> list[int]:
    """The first 8 bytes of a SHA-256 as ints, to compare strings across ranks with `gather`."""
    return list(hashlib.sha256(text.encode()).digest()[:8])


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise HarnessError("--device cuda was asked for but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(requested_device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    ctx = DistContext(
        rank=int(env.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
    )
    ctx.device = pick_device(requested_device, ctx.local_rank)
    if world_size > 1 and not dist.is_initialized():
        # torch.distributed.nn.functional binds `group.WORLD` as default arguments when it
        # is first imported, and DDP's constructor imports it (through torch._dynamo).
        # Imported after init_process_group, it would hold the default group for the life
        # of the process, so destroy_process_group could not stop the group's gloo worker
        # threads; one of them, still dropping a tensor's Python object when the interpreter
        # shut down, aborted the rank ("terminate called without an active exception").
        # Imported before, it binds None.
        import torch.distributed.nn  # noqa: F401

        backend = "nccl" if ctx.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=ctx.device if backend == "nccl" else None,
        )
    return ctx


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def choose_threads(requested: int, local_world_size: int) -> tuple[int, str]:
    """Intra-op CPU threads per rank: the usable cores split between this node's ranks.

    torchrun exports OMP_NUM_THREADS=1; asking torch for more threads than
    OpenMP was told about oversubscribes the cores (8x slower LeNet training
    was measured on 2 cores), so the choice is explicit and logged.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > 0:
        threads, why = requested, "--threads"
    else:
        threads, why = max(1, cores // local_world_size), f"{cores} cores / {local_world_size} local rank(s)"
    torch.set_num_threads(threads)
    return threads, why

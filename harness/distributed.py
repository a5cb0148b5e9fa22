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


def digest_ints(text: str) -> list[int]:
    """The first 8 bytes of a SHA-256 as ints, to compare strings across ranks with `gather`."""
    return list(hashlib.sha256(text.encode()).digest()[:8])


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from harness.errors import HarnessError

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

"""What every rank decides alike at a sync point: the window's mean loss, a non-finite
loss, a stop signal; and how a stop ends every rank. Each decision comes from one
collective, never from a rank's own view, so that no rank stops while another waits."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn

import torch

from harness import distributed
from harness.errors import AgreedError
from harness.stopping import STOP_SIGNALS, StopRequest, agreed_signal

log = logging.getLogger("harness")


class Stopped(Exception):
    """Raised on every rank after a stop signal was honoured: checkpointed, or before the first step."""


def agree_at_sync_point(ctx: distributed.DistContext, window: torch.Tensor, first_step: int, stop_request: StopRequest) -> tuple[float, str]:
    """All ranks: mean loss of the window, and the stop signal if any rank got one ("" if none).

    One all-reduce and one device-to-host copy. A non-finite loss on any rank raises
    on every rank, naming the first bad step.
    """
    nonfinite = ~torch.isfinite(window)
    packed = torch.zeros(2 + len(STOP_SIGNALS), dtype=torch.float64, device=window.device)
    packed[0], packed[1] = window.sum(), nonfinite.any()
    packed[2:] = torch.tensor(stop_request.votes(), dtype=torch.float64)
    loss_sum, any_nonfinite, *votes = ctx.sum(packed).tolist()
    if any_nonfinite:
        bad_step = first_step + int(nonfinite.nonzero()[0, 0]) if nonfinite.any() else 2**62
        step, rank = min((s[0], r) for r, s in enumerate(ctx.gather([bad_step])))
        raise AgreedError(f"loss is NaN or infinite at step {step + 1} on rank {rank}; stopped every rank; any checkpoint already written is intact")
    # Only the all-reduced votes decide, so every rank decides alike: a signal that lands
    # after this rank's part of the all-reduce waits for the next sync point. (Reading
    # this rank's own flag here let a rank stop alone, and the others hang in the next
    # collective: a CI failure.)
    return loss_sum / (len(window) * ctx.world_size), agreed_signal(votes)


def signal_any_rank_got(ctx: distributed.DistContext, stop_request: StopRequest) -> str:
    """All ranks: the stop signal any rank got, "" if none. One all-reduce, so that every
    rank decides alike."""
    votes = torch.tensor(stop_request.votes(), dtype=torch.float64, device=ctx.device)
    return agreed_signal(ctx.sum(votes).tolist())


def stop_every_rank(ctx: distributed.DistContext, step: int, reason: str, what: str, write_record: Callable[[], None]) -> NoReturn:
    """All ranks: rank 0 records the stop (stopped.json), then every rank raises Stopped.
    Rank 0 says so, once every rank is here: one line for the job, not one per rank."""
    # No rank exits, and so no launcher ends the job, before the record is written; a
    # slow filesystem holds the others up to --rank0-timeout, as a checkpoint's write does.
    with ctx.main_only("stop record"):
        if ctx.is_main:
            write_record()
    ctx.barrier()  # then all exit together: rank 0's process may serve the store the others waited on
    if ctx.is_main:
        log.warning(f"{reason}: stopped at step {step} {what}; run again to resume")
    raise Stopped(reason)

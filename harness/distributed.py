"""Process-group setup from the launcher's environment, and the few collectives the loop uses.

torchrun, `accelerate launch` and Slurm's srun (via torchrun) all export RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT. With none of them set the run is a
plain single process and no process group is created. No wait across ranks is
unbounded: collectives run under the process group's timeout (--timeout), and
while rank 0 alone validates or writes files the others wait on its heartbeat
(see `DistContext.main_only`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from harness.device import pick_device, process_group_backend, refuse_nccl_off_gpu
from harness.errors import AgreedError, HarnessError, note_job_rank

log = logging.getLogger("harness")

DEFAULT_TIMEOUT_S = 300.0
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what env:// rendezvous reads


class CommunicationError(HarnessError):
    """Another rank died, stalled or was cut off: not the user's input, so exit
    status 1, but still one line that says what happened."""

    exit_status = 1


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    timeout_s: float = DEFAULT_TIMEOUT_S  # a collective, or rank 0's silence, fails after this
    main_timeout_s: float = 3600.0  # rank 0's validation or file writes, while it is alive
    backend: str = ""  # the process group's, e.g. "gloo" or "cpu:gloo,cuda:nccl"; "" without one
    _main_work: int = 0  # main_only sections so far: the same count on every rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group exists: the run was started by a launcher (even with one rank)."""
        return bool(self.backend)

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
        return [t.tolist() for t in self.gather_tensors(torch.tensor(values, dtype=torch.int64))]

    def gather_tensors(self, tensor: torch.Tensor, device: torch.device | None = None) -> list[torch.Tensor]:
        """Every rank's `tensor` (the same shape and dtype on each) as CPU tensors, in rank
        order, sent from `device` (default: this rank's device, as its backend wants)."""
        if not self.distributed:
            return [tensor.cpu()]
        mine = tensor.to(device or self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        return [g.cpu() for g in gathered]

    @contextlib.contextmanager
    def main_only(self, what: str):
        """Rank 0 does `what` (validation, writing a checkpoint or the run's files) inside
        this block while the other ranks wait at its end.

        They wait on the process group's store rather than in a collective, so a slow
        disk does not trip --timeout: rank 0 bumps a heartbeat every few seconds while it
        works, and the others wait as long as it beats (up to --rank0-timeout). A rank 0
        that died or froze stops beating and ends the job after --timeout. The beat comes
        from a thread of its own, so a rank 0 whose main thread is stuck (a write to a hung
        filesystem) still beats: the others then wait up to --rank0-timeout.
        """
        self._main_work += 1
        if not self.distributed:
            yield
            return
        key = f"harness/main/{self._main_work}"
        store = dist.distributed_c10d._get_default_store()
        if self.is_main:
            with _heartbeat(store, f"{key}/beat", interval=min(5.0, self.timeout_s / 10)):
                yield
            store.set(f"{key}/done", "1")
        else:
            yield
            self._wait_for_main(store, key, what)

    def _wait_for_main(self, store, key: str, what: str) -> None:
        watch = _MainWatch(store, key)
        started = time.monotonic()
        while not watch.finished.wait(0.05):  # wakes at once when rank 0 is done; else looks at the clock
            now = time.monotonic()
            if now - watch.last_change > self.timeout_s:
                raise CommunicationError(
                    f"rank 0 stopped responding during its {what}: no heartbeat for --timeout {self.timeout_s:g} s"
                )
            if now - started > self.main_timeout_s:
                raise CommunicationError(f"rank 0's {what} took longer than --rank0-timeout {self.main_timeout_s:g} s")
        if watch.error is not None:
            raise watch.error


class _MainWatch:
    """Polls rank 0's done flag and heartbeat in the store from a daemon thread.

    The store's server can live in rank 0's own process (the launchers set
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), and a store call to a process that is frozen,
    or on a node that dropped off the network, blocks for ever: the store's timeout does
    not cover it (measured: check, add, get and wait all still blocked 12 s into a 3 s
    timeout). So the calls run here, and the waiting rank judges the heartbeat by
    `last_change`, which a blocked call stops too. The poll interval grows from 1 ms to
    0.1 s, so a short wait ends promptly and a long one costs little; store.check rather
    than a short store.wait, which would log a c10d warning on every slice.
    """

    def __init__(self, store, key: str):
        self.finished = threading.Event()
        self.error: BaseException | None = None  # the store's own, e.g. rank 0's process died
        self.last_change = time.monotonic()
        threading.Thread(target=self._poll, args=(store, key), name="harness-main-watch", daemon=True).start()

    def _poll(self, store, key: str) -> None:
        last_beat, pause = -1, 0.001
        try:
            while not store.check([f"{key}/done"]):
                beat = store.add(f"{key}/beat", 0)
                if beat != last_beat:
                    last_beat, self.last_change = beat, time.monotonic()
                time.sleep(pause)
                pause = min(pause * 2, 0.1)
        except Exception as error:  # noqa: BLE001 - handed to the waiting thread, which raises it
            self.error = error
        self.finished.set()


@contextlib.contextmanager
def _heartbeat(store, key: str, interval: float):
    """Bump `key` in the store every `interval` seconds from a thread, while the block runs."""
    stop = threading.Event()

    def beat():
        failures = 0
        while not stop.wait(interval):
            try:
                store.add(key, 1)
            except Exception as error:  # noqa: BLE001 - one failed call (a network blip) must not end the beats for good
                failures += 1
                if failures == 1:
                    log.warning(f"heartbeat: {first_line(error)}; beating on")

    store.add(key, 1)
    thread = threading.Thread(target=beat, name="harness-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# When one gloo operation times out, gloo closes every pair of the process group and the
# other operations in flight (DDP's other buckets) fail with this message, which names
# neither gloo nor the timeout; which of them surfaces first depends on timing.
GLOO_PAIR_CLOSED_ON_TIMEOUT = "Application timeout caused pair closure"
COLLECTIVE_ERROR_MARKS = ("gloo", "NCCL", "c10d", GLOO_PAIR_CLOSED_ON_TIMEOUT)


def first_line(error: BaseException) -> str:
    """An error's first line of text (torch's carry C++ frames after it), without a closing
    full stop (it goes in parentheses or before a semicolon), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__


def explain_collective_failure(error: BaseException, timeout_s: float) -> CommunicationError | None:
    """One clear error for a collective that failed (gloo and NCCL raise RuntimeErrors
    naming themselves); None for any other error, which keeps its traceback."""
    text = str(error).strip()
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and any(s in text for s in COLLECTIVE_ERROR_MARKS))):
        return None
    detail = first_line(error)
    if any(s in text.lower() for s in ("timed out", GLOO_PAIR_CLOSED_ON_TIMEOUT.lower())):
        return CommunicationError(
            f"no answer from another rank within --timeout {timeout_s:g} s ({detail}); "
            "that rank is stuck or far behind: see its log; any checkpoint already written is intact"
        )
    return CommunicationError(
        f"lost contact with another rank ({detail}); it died or its network failed: "
        "see its log; any checkpoint already written is intact"
    )


def digest_ints(text: str) -> list[int]:
    """The first 8 bytes of a SHA-256 as ints, to compare strings across ranks with `gather`."""
    return list(hashlib.sha256(text.encode()).digest()[:8])


def refuse_different_options(ctx: DistContext, options: dict[str, object]) -> None:
    """Every rank must be started with the same options (one command line on every node).
    Nothing else compares them, and ranks given different ones trained wrongly in silence
    (another --seed or --batch-size: some images twice, others not at all; another --lr:
    weights that drift apart), or failed with a traceback or a misleading timeout (another
    --hidden, --log-every or --max-steps). One digest an option, so the error names those
    that differ; right after joining, before any collective that differing options could
    put out of step. First the options' names, so that harness versions with different
    options are an error too, not gathers of different lengths. An AgreedError: every
    rank finds the same."""
    if not ctx.distributed:
        return
    names = sorted(options)
    named = ctx.gather(digest_ints(repr(names)))
    if any(row != named[0] for row in named):
        raise AgreedError("the ranks run versions of the harness with different options: install the same version on every node")
    digests = [int.from_bytes(hashlib.sha256(repr(options[name]).encode()).digest()[:7], "big") for name in names]
    gathered = ctx.gather(digests)
    differ = [name for i, name in enumerate(names) if any(row[i] != gathered[0][i] for row in gathered)]
    if differ:
        ranks = [rank for rank, row in enumerate(gathered) if row != gathered[0]]
        accelerate = " (under accelerate, ACCELERATE_MIXED_PRECISION sets --precision)" if "--precision" in differ else ""
        raise AgreedError(f"the ranks were started with different options: {', '.join(differ)} on rank(s) "
                          f"{', '.join(map(str, ranks))} differ from rank 0's; start every rank with the same command line{accelerate}")


def env_int(name: str, default: int, least: int | None = None) -> int:
    """A launcher variable as an int; a malformed one (a stray export) is one error naming it."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or (least is not None and value < least):
        what = "an integer" if least is None else f"an integer of at least {least}"
        raise HarnessError(f"{name}={text!r} is not {what}: start the ranks with a launcher, or unset {name}")
    return value


def check_launcher_variables(rank: int, world_size: int, launched: bool) -> None:
    """RANK in range, and under a launcher (or with WORLD_SIZE > 1) every variable of the
    env:// rendezvous set, with a well-formed port on a host whose name resolves."""
    env = os.environ
    if not 0 <= rank < world_size:  # a stray RANK export, say, which would make this process take another's slices
        raise HarnessError(
            f"RANK={rank} with WORLD_SIZE={world_size}{'' if 'WORLD_SIZE' in env else ' (unset)'}: a rank is 0 to WORLD_SIZE-1; "
            "start the ranks with torchrun, or unset RANK for one process"
        )
    if launched or world_size > 1:
        missing = [name for name in LAUNCHER_VARIABLES if name not in env]
        if missing:
            raise HarnessError(
                f"WORLD_SIZE={world_size} is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: start the ranks with torchrun "
                f"(or another launcher that sets {', '.join(LAUNCHER_VARIABLES)}), or unset WORLD_SIZE for one process"
            )
        check_store_address(env["MASTER_ADDR"], env["MASTER_PORT"])


def check_store_address(host: str, port: str) -> None:
    """MASTER_ADDR:MASTER_PORT, where rank 0's store listens: a port, on a host whose name
    resolves. torch reported a malformed port as a failed join (exit 1, advice about start
    times), and a name that does not resolve only after --timeout, under some forty lines
    of its C++ log that never said so."""
    if not (port.isascii() and port.isdecimal() and 1 <= int(port) <= 65535):  # isdigit alone takes "²"
        raise HarnessError(f"MASTER_PORT={port!r} is not a port number (1 to 65535): the port of rank 0's store, which the launcher sets")
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:  # UnicodeError: a label over 63 characters
        raise CommunicationError(f"MASTER_ADDR={host!r} does not resolve ({getattr(e, 'strerror', None) or e}): every rank reaches rank 0's store by it") from None


def init_distributed(
    requested_device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S, main_timeout_s: float = 3600.0, backend: str = "auto"
) -> DistContext:
    env = os.environ
    world_size = env_int("WORLD_SIZE", 1, 1)
    ctx = DistContext(
        rank=env_int("RANK", 0),  # its range is checked below, against WORLD_SIZE
        world_size=world_size,
        local_rank=env_int("LOCAL_RANK", 0, 0),
        local_world_size=env_int("LOCAL_WORLD_SIZE", 1, 1),
        timeout_s=timeout_s,
        main_timeout_s=main_timeout_s,
    )
    ctx.device = pick_device(requested_device, ctx.local_rank)
    refuse_nccl_off_gpu(backend, ctx.device)
    # Under a launcher (torchrun, accelerate, srun + torchrun) there is a process group even
    # for one rank, so that path is the same at every size; a plain `python -m harness`
    # has none.
    launched = "MASTER_ADDR" in env and "WORLD_SIZE" in env
    check_launcher_variables(ctx.rank, world_size, launched)
    note_job_rank(ctx.rank if world_size > 1 else None)
    if launched and not dist.is_initialized():
        # torch.distributed.nn.functional binds `group.WORLD` as default arguments when it
        # is first imported, and DDP's constructor imports it (through torch._dynamo).
        # Imported after init_process_group, it would hold the default group for the life
        # of the process, so destroy_process_group could not stop the group's gloo worker
        # threads; one of them, still dropping a tensor's Python object when the interpreter
        # shut down, aborted the rank ("terminate called without an active exception").
        # Imported before, it binds None.
        import torch.distributed.nn  # noqa: F401

        gpu_shared = requested_device.startswith("cuda:") and ctx.local_world_size > 1
        ctx.backend = process_group_backend(backend, ctx.device, gpu_shared)
        try:
            init_process_group_bounded(ctx.backend, timeout_s, ctx.device)
        except (RuntimeError, ValueError) as error:  # torch's DistStoreError and DistNetworkError are RuntimeErrors
            raise CommunicationError(
                f"could not join the process group at {env['MASTER_ADDR']}:{env['MASTER_PORT']} "
                f"({first_line(error)}): every rank must "
                f"start within --timeout {timeout_s:g} s of the others, with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE"
            ) from None
        try:
            check_same_device_type(ctx)
        except RuntimeError as error:  # another rank died at start-up
            failure = explain_collective_failure(error, timeout_s)
            if failure is None:
                raise
            raise failure from None
    return ctx


def init_process_group_bounded(backend: str, timeout_s: float, device: torch.device) -> None:
    """dist.init_process_group, given at most 2 x timeout_s + 10 s in all.

    Its own timeout does not cover a store that accepts the connection but never answers
    (rank 0 frozen, by SIGSTOP or a hung node, after it opened its store's port): the
    kernel completes the connection, and the TCPStore client's first ping then waits in
    recv for ever (measured: still there 90 s into a 5 s timeout, and deaf to SIGTERM).
    So the call runs on a daemon thread, which is left behind if it never returns; the
    main thread stays free for the signal handlers and raises here instead. CUDA's current
    device is per thread: the joining thread takes this rank's, as the main thread has."""
    limit = 2 * timeout_s + 10  # the store's connect and the gloo rendezvous may each take up to timeout_s
    outcome: list[BaseException | None] = []

    def join() -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - raised on the main thread below
            outcome.append(error)

    thread = threading.Thread(target=join, name="harness-join-process-group", daemon=True)
    thread.start()
    thread.join(limit)
    if not outcome:
        raise RuntimeError(f"no answer from the process group's store within {limit:g} s: is rank 0's process frozen?")
    if outcome[0] is not None:
        raise outcome[0]


def check_same_device_type(ctx: DistContext) -> None:
    """All ranks must train on the same kind of device: `--device auto` on nodes with and
    without GPUs would put some ranks on NCCL and others on gloo, and hang."""
    codes = {"cpu": 0, "cuda": 1}
    mine = torch.tensor([codes.get(ctx.device.type, 2)])
    kinds = [int(t[0]) for t in ctx.gather_tensors(mine, device=torch.device("cpu"))]
    if len(set(kinds)) > 1:
        names = {v: k for k, v in codes.items()}
        where = ", ".join(f"rank {r}: {names.get(k, 'other')}" for r, k in enumerate(kinds))
        raise AgreedError(f"ranks are on different kinds of device ({where}): give every node GPUs, or run all ranks with --device cpu")


# Process groups that shutdown() destroyed while a failed or stopped run's exception was on
# its way out, kept here until the interpreter begins to exit. That exception's traceback
# holds the Trainer, its DDP model, and the model's C++ Reducer, which holds the group too.
# Whoever drops the group's last reference runs ~ProcessGroupGloo, which joins gloo's
# worker threads, and a worker still freeing a finished collective's tensors needs the GIL
# for that. Dropped by the Reducer, when the traceback is freed, the destructor runs with
# the GIL held, and the two wait on each other for ever (pytorch/pytorch#56297; seen after
# a NaN stop on a busy CPU: the rank deaf to SIGTERM until torchrun's SIGKILL, 30 s on).
# Held here, the last reference is this Python one, whose destructor lets go of the GIL.
_groups_of_failed_runs: list[dist.ProcessGroup] = []
atexit.register(_groups_of_failed_runs.clear)  # before teardown, while gloo's threads can still take the GIL


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        if sys.exc_info()[1] is not None:  # called on the way out of a failed run: see above
            _groups_of_failed_runs.append(dist.group.WORLD)
        dist.destroy_process_group()
    ctx.backend = ""


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

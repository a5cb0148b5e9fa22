"""Background threads: rank 0's file writes (BackgroundWriter), and the macro-batch
reader's executor (DaemonExecutor).

Rank 0's file writes (checkpoint files, TensorBoard weight images) go on one background thread.

On a GPU the training thread only launches work, so whatever it spends writing,
hashing and fsyncing files at the end of an epoch the GPU spends idle: on an H200
the end of a LeNet epoch took about 0.3 s against 0.06 s of steps. So the training
thread takes a snapshot (copies of the checkpoint's tensors, the first layers' weights) and
hands the writing to this thread, which runs the jobs one at a time, in order.
`wait()` is where the training thread catches up: for the previous checkpoint before it
hands over the next (so at most one is in flight, and every checkpoint asked for is
written), for everything before a stop is recorded and at the end of the run.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future

log = logging.getLogger("harness")


class BackgroundWriter:
    """One writer thread and its queue of jobs. A job's error is raised on the training
    thread, by the next `submit` or `wait`."""

    def __init__(self, max_queued: int = 4):
        # Bounds the snapshots held in memory (a LeNet checkpoint is 6.7 MB, on the GPU
        # for a GPU run; RunOutputs keeps one checkpoint at most in flight).
        self.max_queued = max_queued
        self._jobs: collections.deque[Callable[[], object]] = collections.deque()
        self._changed = threading.Condition()
        self._submitted = self._done = 0  # jobs so far; they run in order, so job n is done when _done >= n
        self._closing = False
        self._error: BaseException | None = None  # the first job's error, until raised
        self._thread = threading.Thread(target=self._run, name="harness-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], object]) -> int:
        """Queue `job()` after everything queued before it (waiting while the queue is full);
        its number, for `wait`."""
        with self._changed:
            self._raise_error()
            while len(self._jobs) >= self.max_queued:
                self._changed.wait()
                self._raise_error()
            self._jobs.append(job)
            self._submitted += 1
            self._changed.notify_all()
            return self._submitted

    def wait(self, job: int | None = None) -> None:
        """Until job number `job` (default: every job queued so far) and those before it have
        run; raises the first error of any job."""
        with self._changed:
            target = self._submitted if job is None else job
            while self._done < target:
                self._changed.wait()
            self._raise_error()

    def close(self, wait: bool = True) -> None:
        """Finish the queued jobs and stop the thread. An error is logged, not raised: on the
        normal path `wait()` has raised it already, and on a failure it must not hide the
        first error. `wait=False` (a second Ctrl-C, which ends the run at once): the queued
        jobs are dropped and the one running is not waited for (the thread is a daemon). A
        write cut short leaves a temporary file, or a checkpoint's payload without its marker,
        which the next start removes or sets aside; never a damaged file under a real name."""
        with self._changed:
            self._closing = True
            if not wait:
                self._jobs.clear()
            self._changed.notify_all()
        if not wait:
            if self._done < self._submitted:
                log.warning("interrupted: not waiting for the background writer's file write in progress")
            return
        self._thread.join()
        if self._error is not None:
            log.error(f"background writer: {self._error}")
            self._error = None

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._jobs and not self._closing:
                    self._changed.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self._changed.notify_all()  # a submit may wait for room in the queue
            try:
                job()
            except BaseException as e:  # raised on the training thread, by the next submit or wait
                with self._changed:
                    self._error = self._error or e
            finally:
                job = None  # its snapshot (a copy of the whole state) is not held until the next job
                with self._changed:
                    self._done += 1
                    self._changed.notify_all()


class DaemonExecutor:
    """concurrent.futures' one-thread executor (submit returns a Future; jobs run in order),
    on a daemon thread. ThreadPoolExecutor's threads are joined when the interpreter exits,
    so a macro-batch load stuck reading from a hung filesystem kept a failed or stopped
    rank from ending, SIGTERM or not (a FIFO in place of a shard stood in for the hung
    file); `shutdown` here waits a bounded time, and the process can end without it. As
    ThreadPoolExecutor's, the thread ends once the executor is garbage (its jobs done)."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=_run_jobs, args=(self._jobs,), name=name, daemon=True)  # no reference to self
        self._thread.start()
        weakref.finalize(self, self._jobs.put, None)
        self._shut = False

    def submit(self, fn: Callable, *args) -> Future:
        if not self._thread.is_alive() or self._shut:  # as ThreadPoolExecutor's: a job no thread would run
            raise RuntimeError("cannot submit a job after shutdown")
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self, wait_s: float) -> bool:
        """Cancel the jobs not begun and wait up to `wait_s` for the one running; whether the
        thread has ended."""
        self._shut = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        self._jobs.put(None)
        self._thread.join(wait_s)
        return not self._thread.is_alive()


def _run_jobs(jobs: queue.SimpleQueue) -> None:
    """DaemonExecutor's thread: each (future, fn, args) in turn, until a None."""
    while (job := jobs.get()) is not None:
        future, fn, args = job
        job = None  # nothing of a finished job is held while the next is awaited
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:
                future.set_exception(e)
        future = fn = args = None

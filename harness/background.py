"""Rank 0's file writes (checkpoint files, TensorBoard weight images) on one background thread.

On a GPU the training thread only launches work, so whatever it spends writing,
hashing and fsyncing files at the end of an epoch the GPU spends idle: on an H200
the end of a LeNet epoch took about 0.3 s against 0.06 s of steps. So the training
thread takes a snapshot (the serialised checkpoint, the tiled weight images) and
hands the writing to this thread, which runs the jobs one at a time, in order.

A checkpoint that is still queued when the next one comes is dropped: the newer one
supersedes it, so training never waits for a disk slower than the epochs, and the
newest checkpoint on disk is at most one write behind. `wait()` is where the training
thread catches up: before a stop is recorded and at the end of the run.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("harness")


class BackgroundWriter:
    """One writer thread and its queue of jobs. A job's error is raised on the training
    thread, by the next `submit` or `wait`."""

    def __init__(self, max_queued: int = 4):
        # Bounds the snapshots held in memory (a LeNet checkpoint is 6.7 MB).
        self.max_queued = max_queued
        self._jobs: collections.deque[tuple[str, Callable[[], object]]] = collections.deque()
        self._changed = threading.Condition()
        self._running = False  # a job is being run
        self._closing = False
        self._error: BaseException | None = None  # the first job's error, until raised
        self._thread = threading.Thread(target=self._run, name="harness-writer", daemon=True)
        self._thread.start()

    def submit(self, name: str, job: Callable[[], object], supersedes: bool = False) -> None:
        """Queue `job()` after everything queued before it. `supersedes`: queued jobs of the
        same `name` that have not started are dropped (it makes them pointless)."""
        with self._changed:
            self._raise_error()
            if supersedes:
                for dropped in [j for j in self._jobs if j[0] == name]:
                    self._jobs.remove(dropped)
                    log.info(f"background writer: a newer {name} superseded a queued one before it was written")
            while len(self._jobs) >= self.max_queued:
                self._changed.wait()
                self._raise_error()
            self._jobs.append((name, job))
            self._changed.notify_all()

    def wait(self) -> None:
        """Until every queued job has run; raises the first error of any of them."""
        with self._changed:
            while self._jobs or self._running:
                self._changed.wait()
            self._raise_error()

    def close(self) -> None:
        """Finish the queued jobs and stop the thread. An error is logged, not raised: on the
        normal path `wait()` has raised it already, and on a failure it must not hide the
        first error."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
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
                _, job = self._jobs.popleft()
                self._running = True
                self._changed.notify_all()  # a submit may wait for room in the queue
            try:
                job()
            except BaseException as e:  # raised on the training thread, by the next submit or wait
                with self._changed:
                    self._error = self._error or e
            finally:
                with self._changed:
                    self._running = False
                    self._changed.notify_all()

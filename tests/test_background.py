"""Rank 0's background writer (order, errors, a bounded queue) and the reader's daemon executor."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from harness.background import BackgroundWriter, DaemonExecutor

WAIT = 10  # seconds: far above the microseconds these hand-offs take; only bounds a broken test


def blocked_job(ran: list, name: str):
    """A job that records `name` once released; and the event that releases it."""
    release, started = threading.Event(), threading.Event()

    def job():
        started.set()
        assert release.wait(WAIT)
        ran.append(name)

    return job, release, started


def test_jobs_run_in_order_and_submit_does_not_wait_for_them():
    ran, writer = [], BackgroundWriter()
    first, release, started = blocked_job(ran, "first")
    writer.submit(first)
    writer.submit(lambda: ran.append("second"))  # returns while "first" is still blocked
    assert started.wait(WAIT) and ran == []
    release.set()
    writer.wait()
    assert ran == ["first", "second"]
    writer.close()


def test_a_jobs_error_is_raised_once_on_the_next_call():
    ran, writer = [], BackgroundWriter()

    def fails():
        raise OSError("disk full")

    writer.submit(fails)
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    writer.submit(lambda: ran.append("next"))  # raised once: the writer goes on
    writer.wait()
    assert ran == ["next"]
    writer.close()


def test_close_finishes_the_queue_and_logs_an_error_nobody_collected(caplog):
    ran, writer = [], BackgroundWriter()
    writer.submit(lambda: ran.append("images"))

    def fails():
        raise OSError("disk full")

    writer.submit(fails)
    writer.close()  # does not raise: on a failed run it must not hide the first error
    assert ran == ["images"]
    assert "background writer: disk full" in caplog.text


def test_submit_waits_while_the_queue_is_full():
    ran, writer = [], BackgroundWriter(max_queued=1)
    running, release, started = blocked_job(ran, "a")
    writer.submit(running)
    assert started.wait(WAIT)
    writer.submit(lambda: ran.append("b"))  # the queue's one place
    third_queued = threading.Event()

    def submit_third():
        writer.submit(lambda: ran.append("c"))
        third_queued.set()

    submitter = threading.Thread(target=submit_third)
    submitter.start()
    assert not third_queued.wait(0.2)  # full: "b" waits behind the blocked "a"
    release.set()
    assert third_queued.wait(WAIT)
    submitter.join(WAIT)
    writer.wait()
    assert ran == ["a", "b", "c"]
    writer.close()


def test_wait_for_one_job_does_not_wait_for_later_ones():
    ran, writer = [], BackgroundWriter()
    checkpoint = writer.submit(lambda: ran.append("checkpoint"))
    images, release, started = blocked_job(ran, "images")
    writer.submit(images)
    assert started.wait(WAIT)
    writer.wait(checkpoint)  # returns although the later job is still blocked
    assert ran == ["checkpoint"]
    release.set()
    writer.wait()
    assert ran == ["checkpoint", "images"]
    writer.close()


def test_close_without_waiting_leaves_a_running_job_and_drops_the_queued_ones():
    """A second Ctrl-C ends the run at once: close(wait=False) returns while a job (a
    checkpoint write on a slow filesystem) still runs, and the jobs queued behind it never run."""
    ran, writer = [], BackgroundWriter()
    first, release, started = blocked_job(ran, "first")
    writer.submit(first)
    writer.submit(lambda: ran.append("second"))
    assert started.wait(WAIT)
    writer.close(wait=False)  # returns although "first" is blocked
    release.set()
    writer._thread.join(WAIT)
    assert ran == ["first"]


def test_the_first_error_of_several_is_the_one_raised():
    """Several jobs fail: the first's error is raised, not a later one's."""
    writer, release = BackgroundWriter(), threading.Event()
    writer.submit(lambda: release.wait(10))

    def fails(message):
        def job():
            raise OSError(message)
        return job

    writer.submit(fails("first"))
    writer.submit(fails("second"))
    release.set()
    with pytest.raises(OSError, match="first"):
        writer.wait()
    writer.close()


def test_the_daemon_executor_runs_jobs_in_order_with_their_results_and_errors():
    ran, executor = [], DaemonExecutor("test-reader")
    first, release, started = blocked_job(ran, "first")
    done = [executor.submit(first), executor.submit(lambda: ran.append("second") or 2), executor.submit(lambda: 1 / 0)]
    assert started.wait(WAIT) and ran == []
    release.set()
    assert done[1].result(WAIT) == 2 and ran == ["first", "second"]
    with pytest.raises(ZeroDivisionError):
        done[2].result(WAIT)
    assert executor.shutdown(WAIT)
    with pytest.raises(RuntimeError, match="after shutdown"):  # as ThreadPoolExecutor: no future that never completes
        executor.submit(lambda: 4)


def test_the_daemon_executors_shutdown_waits_a_bounded_time_for_a_stuck_job():
    """A job stuck for good (a read from a hung filesystem): shutdown cancels the queued
    ones and returns after its bound, saying the thread has not ended."""
    ran, executor = [], DaemonExecutor("test-reader")
    stuck, release, started = blocked_job(ran, "stuck")
    executor.submit(stuck)
    queued = executor.submit(lambda: ran.append("queued"))
    assert started.wait(WAIT)
    began = time.monotonic()
    assert executor.shutdown(0.2) is False
    assert time.monotonic() - began < 5 and queued.cancelled()
    release.set()  # (the thread ends, having run nothing more)
    assert ran == [] or ran == ["stuck"]


def test_a_process_ends_while_its_reader_is_stuck():
    """ThreadPoolExecutor's threads are joined when the interpreter exits: a rank whose
    reader was stuck on a hung shard file never ended, even on SIGTERM. A daemon thread is not."""
    code = ("import threading\nfrom harness.background import DaemonExecutor\n"
            "executor, started = DaemonExecutor('reader'), threading.Event()\n"
            "executor.submit(lambda: started.set() or threading.Event().wait())\n"
            "started.wait(10)\nprint(executor.shutdown(0.2))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "False\n"), result.stderr


def test_the_daemon_executors_thread_ends_with_the_executor():
    """As ThreadPoolExecutor's: a stream never closed leaves no thread behind once it is garbage."""
    import gc

    executor = DaemonExecutor("test-garbage")
    thread = executor._thread
    assert executor.submit(lambda: 3).result(WAIT) == 3
    del executor
    gc.collect()
    thread.join(WAIT)
    assert not thread.is_alive()

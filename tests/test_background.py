"""Rank 0's background writer: order, errors, a bounded queue."""

from __future__ import annotations

import threading

import pytest

from harness.background import BackgroundWriter

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

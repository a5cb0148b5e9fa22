"""Rank 0's background writer: order, superseded checkpoints, errors, a bounded queue."""

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
    writer.submit("images", first)
    writer.submit("images", lambda: ran.append("second"))  # returns while "first" is still blocked
    assert started.wait(WAIT) and ran == []
    release.set()
    writer.wait()
    assert ran == ["first", "second"]
    writer.close()


def test_a_queued_checkpoint_is_superseded_by_a_newer_one_but_a_running_one_is_not():
    ran, writer = [], BackgroundWriter()
    running, release, started = blocked_job(ran, "checkpoint 50")
    writer.submit("checkpoint", running, supersedes=True)
    assert started.wait(WAIT)
    writer.submit("checkpoint", lambda: ran.append("checkpoint 100"), supersedes=True)
    writer.submit("images", lambda: ran.append("images 100"))
    writer.submit("checkpoint", lambda: ran.append("checkpoint 150"), supersedes=True)
    release.set()
    writer.wait()
    assert ran == ["checkpoint 50", "images 100", "checkpoint 150"]
    writer.close()


def test_a_jobs_error_is_raised_once_on_the_next_call():
    ran, writer = [], BackgroundWriter()

    def fails():
        raise OSError("disk full")

    writer.submit("checkpoint", fails)
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    writer.submit("checkpoint", lambda: ran.append("next"))  # raised once: the writer goes on
    writer.wait()
    assert ran == ["next"]
    writer.close()


def test_close_finishes_the_queue_and_logs_an_error_nobody_collected(caplog):
    ran, writer = [], BackgroundWriter()
    writer.submit("images", lambda: ran.append("images"))

    def fails():
        raise OSError("disk full")

    writer.submit("checkpoint", fails)
    writer.close()  # does not raise: on a failed run it must not hide the first error
    assert ran == ["images"]
    assert "background writer: disk full" in caplog.text


def test_submit_waits_while_the_queue_is_full():
    ran, writer = [], BackgroundWriter(max_queued=1)
    running, release, started = blocked_job(ran, "a")
    writer.submit("images", running)
    assert started.wait(WAIT)
    writer.submit("images", lambda: ran.append("b"))  # the queue's one place
    third_queued = threading.Event()

    def submit_third():
        writer.submit("images", lambda: ran.append("c"))
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

"""Shard sets fetched from a URL or a command into a local cache (harness.data.remote),
against a loopback HTTP server that the tests start themselves and that fails on request."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import ROOT, assert_one_error, cli, kill_tree, run, wait_for
from shard_server import ShardServer

from harness.data.manifest import MAX_MANIFEST_BYTES, load_manifest
from harness.data.remote import RemoteShards, is_remote, lock_path, part_path
from harness.errors import HarnessError

pytestmark = pytest.mark.timeout(30)
NO_PROXY = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@pytest.fixture
def server(shards, monkeypatch):
    for key, value in NO_PROXY.items():
        monkeypatch.setenv(key, value)
    served = ShardServer(shards)
    try:
        yield served
    finally:
        served.close()


def remote(base: str, cache: Path, **options) -> RemoteShards:
    return RemoteShards(base, cache, **{"timeout_s": 5.0, "backoff_s": 0.01, "attempts": 3, **options})


def train_shards(shard_dir: Path) -> list[dict]:
    return load_manifest(shard_dir)["splits"]["train"]["shards"]


def fetch(shard_set: RemoteShards, shard: dict) -> Path:
    return shard_set.shard_path(shard["name"], shard["bytes"], shard["sha256"])


def cache_listing(cache: Path) -> tuple[list[str], list[str]]:
    """(cached shard files, partial files) in the cache's shard directory."""
    names = sorted(p.name for p in (cache / "shards").iterdir()) if (cache / "shards").is_dir() else []
    return [n for n in names if not n.startswith(".")], [n for n in names if n.endswith(".part")]


def test_is_remote():
    assert is_remote("http://host/mnist/") and is_remote("HTTPS://host/mnist") and is_remote("pipe:cat /x/{name}")
    assert not is_remote("/data/shards") and not is_remote("shards") and not is_remote("file:///data/shards")


@pytest.mark.parametrize("slash", ["", "/"])
def test_fetches_a_split_and_then_uses_the_cache(server, shards, tmp_path, slash):
    base = server.url.rstrip("/") + slash
    shard_set = remote(base, tmp_path / "cache")
    with shard_set.fetched_manifest() as directory:
        assert (directory / "manifest.json").read_bytes() == (shards / "manifest.json").read_bytes()
        train = train_shards(directory)  # load_manifest checks the fetched copy
    assert not directory.exists()  # each process reads its own fetched copy, then removes it
    paths = [fetch(shard_set, shard) for shard in train]
    for shard, path in zip(train, paths):
        assert path.read_bytes() == (shards / shard["name"]).read_bytes()
        assert shard["sha256"] in path.name
    assert shard_set.bytes_fetched == sum(s["bytes"] for s in train) + (shards / "manifest.json").stat().st_size
    again = remote(base, tmp_path / "cache")  # a later run: the manifest again, no shard
    with again.fetched_manifest() as directory:
        assert train_shards(directory) == train
    assert [fetch(again, shard) for shard in train] == paths
    assert [server.gets(s["name"]) for s in train] == [1] * len(train) and server.gets("manifest.json") == 2
    assert again.bytes_fetched == (shards / "manifest.json").stat().st_size
    assert cache_listing(tmp_path / "cache") == (sorted(p.name for p in paths), [])


def test_each_process_reads_the_manifest_it_fetched(server, shards, tmp_path):
    """Two processes sharing a cache fetch the manifest, and the set is republished between
    their GETs: each reads the version it got. (One shared copy would show both the later
    version and hide the change that the ranks' manifest check is there to catch.)"""
    republished = json.loads((shards / "manifest.json").read_text())
    republished["dataset"] += "-v2"
    (shards / "manifest.json.alt").write_text(json.dumps(republished))
    server.fail("manifest.json", "alt", count=1)
    with remote(server.url, tmp_path / "cache").fetched_manifest() as first:
        with remote(server.url, tmp_path / "cache").fetched_manifest() as second:
            assert load_manifest(second) == json.loads((shards / "manifest.json").read_text())
            assert load_manifest(first) == republished


@pytest.mark.parametrize("kind", ["drop", 503, 429, "stall"])
def test_transient_failures_are_retried(server, shards, tmp_path, kind):
    shard = train_shards(shards)[0]
    server.fail(shard["name"], kind, count=2)
    path = fetch(remote(server.url, tmp_path / "cache", timeout_s=0.3), shard)
    assert path.read_bytes() == (shards / shard["name"]).read_bytes()
    assert server.gets(shard["name"]) == 3
    assert cache_listing(tmp_path / "cache") == ([path.name], [])


def test_a_connection_that_always_drops_fails_after_the_attempts(server, shards, tmp_path, caplog):
    """Each failed attempt but the last is a warning as it happens (a server that never
    answered was five minutes of silence before its error), then one error."""
    shard = train_shards(shards)[0]
    server.fail(shard["name"], "drop")
    start = time.monotonic()
    with pytest.raises(HarnessError) as error, caplog.at_level("WARNING", logger="harness"):
        fetch(remote(server.url, tmp_path / "cache", attempts=4), shard)
    url = server.url + shard["name"]
    retries = [r.getMessage() for r in caplog.records]
    assert [m.split(" (attempt ")[1] for m in retries] == [f"{n} of 4; trying again in {0.01 * 2 ** (n - 1):g} s)" for n in (1, 2, 3)]
    assert all(m.startswith(f"{url}: ") and "ended after" in m for m in retries), retries
    message = str(error.value)
    assert message.startswith(server.url + shard["name"] + ": ") and "after 4 attempts" in message, message
    assert f"ended after {shard['bytes'] // 2} of {shard['bytes']} bytes" in message, message
    assert server.gets(shard["name"]) == 4
    # Back-offs of 0.01 + 0.02 + 0.04 s (remote()) and four loopback transfers: well under a
    # second. Attempts that waited out their 5 s timeout instead of seeing the drop: 20 s.
    assert time.monotonic() - start < 10
    assert cache_listing(tmp_path / "cache") == ([], [])


@pytest.mark.parametrize(
    "kind, problem",
    [("flip", "SHA-256"), ("wrong-length", "Content-Length"), ("long", "sent more than the manifest's"), (404, "HTTP 404")],
)
def test_a_wrong_file_fails_at_once(server, shards, tmp_path, kind, problem):
    shard = train_shards(shards)[1]
    server.fail(shard["name"], kind)
    with pytest.raises(HarnessError) as error:
        fetch(remote(server.url, tmp_path / "cache", attempts=5, backoff_s=5.0), shard)  # a retry would time the test out
    message = str(error.value)
    assert message.startswith(server.url + shard["name"] + ": ") and problem in message, message
    assert "after 1 attempt; not retried" in message and "\n" not in message, message
    assert server.gets(shard["name"]) == 1
    assert cache_listing(tmp_path / "cache") == ([], [])


def test_manifest_is_capped_in_size(server, shards, tmp_path):
    (shards / "manifest.json").write_bytes(b" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(HarnessError, match=r"manifest\.json: Content-Length \d+; the limit is \d+ bytes"):
        with remote(server.url, tmp_path / "cache").fetched_manifest():
            pass
    server.fail("manifest.json", "long")  # no Content-Length: cut off while reading
    with pytest.raises(HarnessError, match="sent more than the limit's"):
        with remote(server.url, tmp_path / "cache").fetched_manifest():
            pass
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_cache_limit_evicts_the_least_recently_used(server, shards, tmp_path):
    first, second, third = train_shards(shards)  # 80, 80 and 40 images
    cache = tmp_path / "cache"
    shard_set = remote(server.url, cache, cache_limit_bytes=first["bytes"] + second["bytes"])
    paths = [fetch(shard_set, first), fetch(shard_set, second)]
    an_hour_ago = time.time() - 3600  # older than the hit's touch below, whatever the clock's resolution
    for age, path in enumerate(paths):
        os.utime(path, (an_hour_ago + age, an_hour_ago + age))
    assert fetch(shard_set, first) == paths[0]  # a hit: now the second is the least recently used
    kept = fetch(shard_set, third)
    assert cache_listing(cache) == (sorted([paths[0].name, kept.name]), [])
    assert [server.gets(s["name"]) for s in (first, second, third)] == [1, 1, 1]
    fetch(shard_set, second)  # fetched again, evicting the first
    assert cache_listing(cache)[0] == sorted([kept.name, paths[1].name]) and server.gets(second["name"]) == 2
    with pytest.raises(HarnessError) as error:
        fetch(remote(server.url, cache, cache_limit_bytes=first["bytes"] - 1), first)
    assert f"{first['name']}: the shard is {first['bytes']} bytes" in str(error.value) and "--shard-cache-limit-gb" in str(error.value)


def test_eviction_never_touches_files_the_cache_did_not_write(server, shards, tmp_path):
    """A user's own files in the cache folder (say `--shard-cache .` beside a packed set)
    are neither counted nor evicted; the cache's shards are. Nor are a user's .part files
    (a browser's unfinished download): any name ending in .part was taken for a dead
    process's part file and removed."""
    first, second, _ = train_shards(shards)
    cache = tmp_path / "cache"
    (cache / "shards" / "mine").mkdir(parents=True)
    own = cache / "shards" / "train-000000.tar"
    own.write_bytes(bytes(10 * first["bytes"]))
    own_parts = [cache / "shards" / name for name in ("movie.mkv.part", f".{'0' * 64}.part", ".notes.txt.part")]
    for part in own_parts:
        part.write_bytes(b"mine")
    shard_set = remote(server.url, cache, cache_limit_bytes=first["bytes"] + 1)
    fetch(shard_set, first)
    fetch(shard_set, second)  # evicts the first cached shard, not the user's files
    assert own.stat().st_size == 10 * first["bytes"] and (cache / "shards" / "mine").is_dir()
    assert all(part.read_bytes() == b"mine" for part in own_parts)
    assert cache_listing(cache)[0] == sorted(["mine", "movie.mkv.part", own.name, shard_set.cached_path(second["name"], second["sha256"]).name])


def test_a_dead_process_part_file_is_removed_to_make_room(server, shards, tmp_path):
    first, second, _ = train_shards(shards)
    cache = tmp_path / "cache"
    shard_set = remote(server.url, cache, cache_limit_bytes=first["bytes"] + 1)
    stale = part_path(shard_set.cached_path(second["name"], second["sha256"]))
    stale.parent.mkdir(parents=True)
    stale.write_bytes(bytes(second["bytes"]))  # nobody holds its lock
    assert fetch(shard_set, first).is_file()
    assert cache_listing(cache) == ([shard_set.cached_path(first["name"], first["sha256"]).name], [])


def test_a_held_lock_is_waited_for_a_bounded_time(server, shards, tmp_path):
    shard = train_shards(shards)[0]
    shard_set = remote(server.url, tmp_path / "cache", lock_timeout_s=0.3)
    lock = lock_path(shard_set.cached_path(shard["name"], shard["sha256"]))
    lock.parent.mkdir(parents=True)
    with open(lock, "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(HarnessError, match="held this lock for over 0.3 s"):
            fetch(shard_set, shard)
    assert fetch(shard_set, shard).read_bytes() == (shards / shard["name"]).read_bytes()


@contextmanager
def holding(lock: Path, work):
    """A thread that holds `lock` (a real flock, on an open file of its own, as another
    process would) while it runs work(done), then lets it go; `done` is set, and the thread
    joined, on leaving."""
    locked, done = threading.Event(), threading.Event()

    def hold():
        with open(lock, "ab") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            locked.set()
            work(done)

    lock.parent.mkdir(parents=True, exist_ok=True)
    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert locked.wait(5)
    try:
        yield
    finally:
        done.set()
        thread.join(10)
        assert not thread.is_alive()


def stalling(**options) -> dict:
    """Options under which a holder is given up after 1.5 s of a still part file (stall_s:
    one attempt's connection, headers and first read, 0.5 s each), the lock itself after 10 s."""
    return {"timeout_s": 0.5, "attempts": 1, "lock_timeout_s": 10.0, **options}


def timed_fetch(shard_set: RemoteShards, shard: dict) -> tuple[Path, float]:
    started = time.monotonic()
    return fetch(shard_set, shard), time.monotonic() - started


@pytest.mark.parametrize("part", ["absent", "reserved"])
def test_a_holder_whose_part_file_is_still_is_given_up(server, shards, tmp_path, part):
    """A holder that stopped (SIGSTOP, a hung disk, a deadlock) is given up on once its part
    file has not changed for stall_s, not after lock_timeout_s (hours by default). A part
    reserved at the shard's full length (sparse, as under a cache limit) and never written is
    still too."""
    shard = train_shards(shards)[0]
    shard_set = remote(server.url, tmp_path / "cache", **stalling())
    cached = shard_set.cached_path(shard["name"], shard["sha256"])
    lock, part_file = lock_path(cached), part_path(cached)
    with holding(lock, lambda done: done.wait()):
        if part == "reserved":
            with open(part_file, "wb") as f:
                f.truncate(shard["bytes"])
        started = time.monotonic()
        with pytest.raises(HarnessError) as error:
            fetch(shard_set, shard)
        waited = time.monotonic() - started
    message = str(error.value)
    assert f"{lock}: the process holding this lock has not written to {part_file} for over 1.5 s" in message, message
    assert f"it is stuck (stopped, or on a hung disk or network): end it (`lsof {lock}`" in message and "\n" not in message
    # stall_s is 1.5 s (stalling()); under 5: refused then, not at the lock's 10 s timeout.
    assert 1.5 < waited < 5 and server.gets(shard["name"]) == 0
    assert fetch(shard_set, shard).read_bytes() == (shards / shard["name"]).read_bytes()  # once the holder is gone


@pytest.mark.parametrize("writes", ["appends", "rewrites its start"])
def test_a_holder_whose_download_moves_is_waited_for(server, shards, tmp_path, writes):
    """A live holder writes its part file every 0.3 s for 3 s, three times the stall bound,
    then renames it into place: the waiter waits it out and uses that file. Rewriting the
    start of a reserved part (as a retry does) changes only its mtime: progress too."""
    shard = train_shards(shards)[0]
    shard_set = remote(server.url, tmp_path / "cache", **stalling())
    cached = shard_set.cached_path(shard["name"], shard["sha256"])
    data = (shards / shard["name"]).read_bytes()

    def download(done):
        with open(part_path(cached), "wb") as out:
            if writes == "rewrites its start":
                out.truncate(len(data))
            for i in range(10):
                if done.wait(0.3):
                    return
                if writes == "appends":
                    out.write(data[i * len(data) // 10 : (i + 1) * len(data) // 10])
                else:
                    out.seek(0)
                    out.write(data[:1000])
                out.flush()
            out.seek(0)
            out.write(data)
        os.replace(part_path(cached), cached)

    with holding(lock_path(cached), download):
        path, waited = timed_fetch(shard_set, shard)
    assert path == cached and path.read_bytes() == data
    assert waited > 2.5 and server.gets(shard["name"]) == 0


def test_a_holder_riding_out_its_retries_is_waited_for(server, shards, tmp_path):
    """A holder whose first two attempts get the headers and then no body (each wait just
    inside its 0.5 s timeout) leaves its part file unwritten for about 1.7 s, longer than
    two timeouts and a backoff, then downloads the shard on its third attempt: a waiter
    whose stall bound is the holder's silent worst case (3 attempts of 3 waits of 0.5 s,
    4.5 s) waits it out and uses that file."""
    shard = train_shards(shards)[0]
    server.fail(shard["name"], "silent", count=2)
    holder_set, waiter_set = (remote(server.url, tmp_path / "cache", **stalling(attempts=3)) for _ in range(2))
    assert waiter_set.stall_s == pytest.approx(4.5 + 0.01 + 0.02)
    held: list[Path] = []
    holder = threading.Thread(target=lambda: held.append(fetch(holder_set, shard)), daemon=True)
    holder.start()
    try:
        wait_for(lambda: server.gets(shard["name"]) > 0, 10, "the holder's first GET")
        path, waited = timed_fetch(waiter_set, shard)
    finally:
        holder.join(20)
    assert held == [path] and path.read_bytes() == (shards / shard["name"]).read_bytes()
    assert waited > 1.2 and server.gets(shard["name"]) == 3  # the waiter fetched nothing itself


def test_a_waiters_own_pause_does_not_count_as_the_holders_stillness(tmp_path):
    """A gap of over 1 s between two polls is the waiting process's own pause (a suspended
    job: its holder was stopped too), not time in which the holder failed to write."""
    from harness.data.remote import _PartWatch

    part = tmp_path / "x.part"
    part.write_bytes(b"1")
    watch = _PartWatch(part, now=100.0)
    assert watch.still_for(100.5) == pytest.approx(0.5)
    assert watch.still_for(400.5) == pytest.approx(0.5)  # suspended for 300 s between two polls
    assert watch.still_for(401.0) == pytest.approx(1.0)
    part.write_bytes(b"12")
    assert watch.still_for(401.05) == 0


def test_a_held_eviction_lock_is_given_up_after_the_stall_bound(server, shards, tmp_path):
    """The eviction lock has no part file: it is held only to scan the cache and evict (well
    under a second), so one held for stall_s is held by a stuck process."""
    shard = train_shards(shards)[0]
    shard_set = remote(server.url, tmp_path / "cache", cache_limit_bytes=10 * shard["bytes"], **stalling())
    lock = tmp_path / "cache" / "shards" / ".cache.lock"
    with holding(lock, lambda done: done.wait()):
        started = time.monotonic()
        with pytest.raises(HarnessError, match=r"\.cache\.lock: another process has held this lock for over 1\.5 s, though"):
            fetch(shard_set, shard)
        assert 1.5 < time.monotonic() - started < 5  # as above: refused once stall_s has passed
    assert fetch(shard_set, shard).read_bytes() == (shards / shard["name"]).read_bytes()


def test_a_cancel_ends_a_wait_for_a_lock(server, tmp_path):
    """A stopping run's close ends a fetch that waits for another process's download at
    once, not at the stall bound (here 10 s) or lock_timeout_s."""
    shard_set = remote(server.url, tmp_path / "cache")
    with holding(lock_path(shard_set.cached_path("train-000000.tar", "0" * 64)), lambda done: done.wait()):
        assert_a_cancel_ends_the_fetch(shard_set)


def test_names_are_plain_file_names(server, tmp_path):
    shard_set = remote(server.url, tmp_path / "cache")
    for name in ("../manifest.json", "a/b.tar", ".hidden", "x;rm -rf y"):
        with pytest.raises(HarnessError, match="not a plain file name"):
            shard_set.shard_path(name, 10, "0" * 64)
    with pytest.raises(HarnessError, match="not a SHA-256"):
        shard_set.shard_path("train-000000.tar", 10, "0" * 63)


def test_an_unusable_cache_directory_is_one_error(server, shards, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    shard_set = remote(server.url, tmp_path / "file" / "cache")
    with pytest.raises(HarnessError, match="cannot create the shard cache directory"):
        with shard_set.fetched_manifest():
            pass
    with pytest.raises(HarnessError, match="cannot create the shard cache directory"):
        fetch(shard_set, train_shards(shards)[0])


# --- pipe: --------------------------------------------------------------------------------------


def test_pipe_location(shards, tmp_path):
    base = f"pipe:cat {shlex.quote(str(shards))}/{{name}}"
    shard_set = remote(base, tmp_path / "cache")
    with shard_set.fetched_manifest() as directory:
        train = train_shards(directory)
    for shard in train:
        assert fetch(shard_set, shard).read_bytes() == (shards / shard["name"]).read_bytes()
    assert shard_set.bytes_fetched == sum(s["bytes"] for s in train) + (shards / "manifest.json").stat().st_size


def test_pipe_failures(shards, tmp_path):
    shard = train_shards(shards)[0]
    cases = [
        (f"cat {tmp_path}/missing/{{name}}", 2, f"pipe:cat {tmp_path}/missing/{shard['name']}: command exited with status 1: ", "after 2 attempts"),
        ("no-such-command-here {name}", 1, "command exited with status 127", "not retried"),
        (f"cat {shards}/{{name}} {shards}/{{name}}", 1, "sent more than the manifest's", "not retried"),
        (f"sleep 20; cat {shards}/{{name}}", 1, "no output for 0.3 s", "after 1 attempt"),  # killed, with its children
    ]
    for command, attempts, problem, retried in cases:
        start = time.monotonic()
        with pytest.raises(HarnessError) as error:
            fetch(remote("pipe:" + command, tmp_path / "cache", attempts=attempts, timeout_s=0.3), shard)
        message = str(error.value)
        assert problem in message and retried in message and "\n" not in message, message
        assert time.monotonic() - start < 5  # each ends within 0.3 s of silence or at once; waiting out the sleep takes 20 s
    assert cache_listing(tmp_path / "cache") == ([], [])
    with pytest.raises(HarnessError, match=r"needs \{name\}"):
        RemoteShards(f"pipe:cat {shards}/train-000000.tar", tmp_path / "cache")


# --- several processes, one cache -----------------------------------------------------------------

CHILD = """
import sys, time
from pathlib import Path
from harness.data.remote import RemoteShards
base, cache, name, size, sha256, go, me = sys.argv[1:]
Path(go + "." + me).touch()
while not Path(go).exists():
    time.sleep(0.01)
shard_set = RemoteShards(base, Path(cache), backoff_s=0.01, lock_timeout_s=20)
print(shard_set.shard_path(name, int(size), sha256), shard_set.bytes_fetched)
"""


def test_processes_sharing_a_cache_download_a_shard_once(server, shards, tmp_path):
    shard = train_shards(shards)[0]
    server.fail(shard["name"], "slow")  # the second process asks while the first downloads
    go = tmp_path / "go"
    args = [server.url, tmp_path / "cache", shard["name"], shard["bytes"], shard["sha256"], go]
    env = {**os.environ, **NO_PROXY}
    children = [
        subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args), str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    try:
        wait_for(lambda: all(Path(f"{go}.{i}").exists() for i in range(2)), 20, "both processes to start")
        go.touch()
        results = [child.communicate(timeout=20) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert [child.returncode for child in children] == [0, 0], results
    paths, fetched = zip(*(out.split() for out, _ in results))
    assert paths[0] == paths[1] and Path(paths[0]).read_bytes() == (shards / shard["name"]).read_bytes()
    assert sorted(int(n) for n in fetched) == [0, shard["bytes"]]
    assert server.gets(shard["name"]) == 1


def test_show_reads_an_image_from_a_url_and_names_a_damaged_one(server, shards, tmp_path, capsys, monkeypatch):
    """`harness show --shards URL`: the same image as from the directory, fetched into
    $HARNESS_CACHE; a shard served with a flipped byte is one error naming its URL."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    local = cli(capsys, "show", "--shards", shards, "--index", "7")
    assert local[0] == 0
    assert cli(capsys, "show", "--shards", server.url, "--index", "7") == local
    assert list((tmp_path / "cache" / "shards").glob("*-train-000000.tar"))  # $HARNESS_CACHE/shards/ holds the shards
    server.fail("test-000000.tar", "flip")
    rc, _, err = cli(capsys, "show", "--shards", server.url, "--split", "test", "--index", "0")
    assert_one_error(rc, err, f"{server.url}test-000000.tar", "SHA-256", "not retried")


def test_gs_and_file_urls(shards, tmp_path, capsys, monkeypatch):
    """gs://BUCKET/PATH/ runs `gsutil cat` as webdataset's gopen does (here a stand-in gsutil
    on PATH that serves the shard directory as the bucket); file:// is the local path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gsutil").write_text(f'#!/bin/sh\n[ "$1" = cat ] || exit 2\nexec cat "{shards}/${{2#gs://bucket/mnist/}}"\n')
    (bin_dir / "gsutil").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    local = cli(capsys, "show", "--shards", shards, "--index", "3")
    assert local[0] == 0
    assert cli(capsys, "show", "--shards", "gs://bucket/mnist", "--index", "3") == local
    assert cli(capsys, "show", "--shards", f"file://{shards}", "--index", "3") == local
    rc, _, err = cli(capsys, "show", "--shards", "gs://bucket/elsewhere/", "--index", "3")
    assert_one_error(rc, err, "pipe:gsutil cat gs://bucket/elsewhere/manifest.json", "exited with status 1", "after 5 attempts")


def test_a_remote_manifest_cannot_make_the_reader_lay_out_blocks_its_shard_lacks(server, shards, tmp_path):
    """A URL's shard sizes are checked as the shard arrives, but a reader lays out a shard's
    blocks before it reads it. A manifest claiming 300,000 one-image blocks in a small
    shard is refused as it is read (it used to make 88 MiB of lists before the shard's size
    was refused; 2**31 would have asked for some 800 GB); the most it may claim, 100,000,
    lays out under 40 MiB (29.4 MiB measured under tracemalloc: ~300 bytes a block)."""
    import tracemalloc

    from harness.data.manifest import MAX_BLOCKS_PER_SHARD, min_shard_bytes
    from harness.data.shard_set import ShardSource, ShardSplit

    def claim(blocks: int) -> None:
        manifest = json.loads((shards / "manifest.json").read_text())
        entry = manifest["splits"]["test"]["shards"][0]
        manifest["splits"]["test"] = {"samples": blocks, "block_size": 1,
                                      "shards": [{**entry, "samples": blocks, "bytes": min_shard_bytes(blocks, 1)}]}
        (shards / "manifest.json").write_text(json.dumps(manifest))

    claim(300_000)
    with pytest.raises(HarnessError, match=r"manifest\.json: splits\.test\.shards\[0\]\.samples: 300000 images in blocks of 1 "
                                           r"are 300,000 blocks; a shard holds at most 100,000"):
        ShardSource(server.url, tmp_path / "cache")
    claim(MAX_BLOCKS_PER_SHARD)
    split = ShardSplit(ShardSource(server.url, tmp_path / "cache"), "test")
    tracemalloc.start()
    try:
        with pytest.raises(HarnessError, match="Content-Length"):
            split.load_all()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20, f"{peak / 2**20:.0f} MiB allocated before the shard's size was checked"


def test_closing_a_stream_cuts_short_the_download_its_reader_has_begun(server, shards, tmp_path):
    """A run that stops (a signal, an error, early stopping) while the reader thread loads
    the next macro-batch from a URL: closing the stream does not wait out that shard's
    download (up to 30 min an attempt, five attempts), which outlasts torchrun's 30 s grace
    period. Here the shard would take 30 s; the close takes well under a second on a
    2-core Xeon (0.5 s in a hand-run repro), and 10 s leaves room for a slower machine.
    The source fetches again afterwards."""
    import torch

    from harness.data.shard_set import ShardSource, ShardSplit
    from harness.data.stream import MacroBatchStream

    server.fail("train-000001.tar", "trickle", count=1)
    source = ShardSource(server.url, tmp_path / "cache")
    stream = MacroBatchStream(ShardSplit(source, "train"), 20, 80, seed=0, device=torch.device("cpu"), prefetch=True, shuffle=False)
    batches = stream.epoch(0)
    next(batches)  # macro-batch 0 is shard 0; the reader now loads shard 1
    wait_for(lambda: server.gets("train-000001.tar") == 1, 30, "the reader's request for shard 1")
    started = time.monotonic()
    stream.close()
    assert time.monotonic() - started < 10
    shard_dir = tmp_path / "cache" / "shards"
    assert not [p for p in shard_dir.iterdir() if p.name.endswith(("train-000001.tar", "train-000001.tar.part"))]  # nor half-kept
    assert source.shard_path("train", 1).is_file() and server.gets("train-000001.tar") == 2


HEADERS_DRIP = b"HTTP/1.1 200 OK\r\nX-Slow: "  # then a byte of that header every 0.2 s
BODY_DRIP = b"HTTP/1.0 200 OK\r\n\r\n{"  # no Content-Length: then a byte of the body every 0.2 s


@pytest.fixture
def dripping_server(monkeypatch, request):
    """A server that answers every request with a status line and then one header byte every
    0.2 s, for ever: each read is well within any timeout, and the headers never end.
    Parametrized indirectly with BODY_DRIP, it drips a body of no stated length instead."""
    start = getattr(request, "param", HEADERS_DRIP)
    for key, value in NO_PROXY.items():
        monkeypatch.setenv(key, value)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    closing = threading.Event()

    def drip(connection):
        with connection:
            try:
                connection.recv(65536)
                connection.sendall(start)
                while not closing.wait(0.2):
                    connection.sendall(b" ")
            except OSError:  # the client cut the connection, as it should
                pass

    def serve():
        while not closing.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=drip, args=(connection,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/set/"
    closing.set()
    listener.shutdown(socket.SHUT_RDWR)  # close() alone leaves the accept() above blocked, and its thread alive
    listener.close()


def test_a_server_that_drips_its_headers_is_cut_off_at_the_deadline(dripping_server, tmp_path):
    """The deadline bounds an attempt from the request on, not only once the body flows:
    a server that sends a header a byte at a time (each read within the 5 s timeout) held
    urlopen for hours."""
    shard_set = remote(dripping_server, tmp_path / "cache", attempts=1, deadline_s=2.0)
    started = time.monotonic()
    with pytest.raises(HarnessError, match=r"train-000000\.tar: took longer than 2 s; stopped reading \(after 1 attempt\)"):
        shard_set.shard_path("train-000000.tar", 100, "0" * 64)
    assert time.monotonic() - started < 6


def assert_a_cancel_ends_the_fetch(shard_set: RemoteShards) -> None:
    """A fetch on another thread, as the stream's reader thread fetches, left 1 s to start
    waiting, then cancelled as a stopping run's close cancels it: it ends within 3 s, with
    the cancel's error."""
    outcome = []

    def fetch_in_thread():
        try:
            shard_set.shard_path("train-000000.tar", 100, "0" * 64)
        except HarnessError as e:
            outcome.append(str(e))

    thread = threading.Thread(target=fetch_in_thread, daemon=True)
    thread.start()
    time.sleep(1.0)
    started = time.monotonic()
    with shard_set.fetches_cancelled():
        thread.join(10)
    assert not thread.is_alive() and time.monotonic() - started < 3
    assert outcome and "fetch cancelled (the run is ending)" in outcome[0], outcome


def test_a_cancel_cuts_a_fetch_whose_headers_drip(dripping_server, tmp_path):
    """A stopping run's close (fetches_cancelled) ends a fetch still waiting for its headers
    at once, not at the attempt's deadline (30 min by default)."""
    assert_a_cancel_ends_the_fetch(remote(dripping_server, tmp_path / "cache", attempts=1))


def test_pack_download_cuts_off_a_mirror_that_drips_its_headers(dripping_server, tmp_path):
    """`harness pack --source download`: a mirror that drips its headers is given up at the deadline."""
    from harness.data.download import Published, fetch_checked

    started = time.monotonic()
    problem = fetch_checked(dripping_server + "x.gz", tmp_path / "x.gz", Published(100, "0" * 64, "0" * 32), timeout_s=5, deadline_s=2)
    assert problem == "took longer than 2 s; stopped reading"
    assert time.monotonic() - started < 6 and not list(tmp_path.iterdir())


def test_a_cancel_cuts_a_pipe_fetch_waiting_for_output(tmp_path):
    """A `pipe:` command that has said nothing yet: a stopping run's close ends the fetch at
    once. Its reads waited for output up to the silence timeout (60 s by default) before
    they looked at the cancel."""
    assert_a_cancel_ends_the_fetch(remote("pipe:sleep 60; cat /nonexistent/{name}", tmp_path / "cache", attempts=1, timeout_s=60.0))


@pytest.fixture
def unanswered_url():
    """A URL whose server never completes a connection, like a host behind a firewall that
    drops connection requests: a loopback listener that never accepts, its backlog filled
    first, after which the kernel drops further SYNs (tcp_abort_on_overflow=0, the default)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address, fillers = listener.getsockname(), []
    for _ in range(3):  # a backlog of 0 still queues one; the connects past it wait
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
    time.sleep(0.2)
    probe = socket.socket()
    probe.settimeout(1.0)
    with pytest.raises(TimeoutError):  # the URL is unanswered, or the tests below test nothing
        probe.connect(address)
    probe.close()
    yield f"http://127.0.0.1:{address[1]}/set/"
    for sock in (*fillers, listener):
        sock.close()


def test_a_cancel_cuts_a_fetch_still_connecting(unanswered_url, tmp_path):
    """A stopping run's close ends a fetch whose connection is not made yet at once: the
    connect waited for the whole timeout (60 s by default) for each of the host's
    addresses, so a SIGTERM at start-up outlasted torchrun's 30 s grace and left no
    stop record to requeue by."""
    assert_a_cancel_ends_the_fetch(remote(unanswered_url, tmp_path / "cache", attempts=1, timeout_s=60.0))


def test_a_connect_that_outlasts_the_deadline_is_cut_there(unanswered_url, tmp_path):
    """The deadline bounds the connect too, for the shard cache and for pack's download."""
    from harness.data.download import Published, fetch_checked

    shard_set = remote(unanswered_url, tmp_path / "cache", attempts=1, timeout_s=60.0, deadline_s=1.0)
    started = time.monotonic()
    with pytest.raises(HarnessError, match=r"train-000000\.tar: took longer than 1 s; stopped reading \(after 1 attempt\)"):
        shard_set.shard_path("train-000000.tar", 100, "0" * 64)
    assert time.monotonic() - started < 5  # 1 s, polled every 0.05 s; the connect alone would take 60
    started = time.monotonic()
    problem = fetch_checked(unanswered_url + "x.gz", tmp_path / "x.gz", Published(100, "0" * 64, "0" * 32), timeout_s=60, deadline_s=1)
    assert problem == "took longer than 1 s; stopped reading"
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("dripping_server", [BODY_DRIP], indirect=True, ids=["body"])
def test_a_manifest_cut_at_the_deadline_is_not_taken_as_whole(dripping_server, tmp_path):
    """A read from the socket the watchdog shut ends like a whole body. A shard's size shows
    the cut; a manifest has none, so its cut body ("{" and spaces) was taken as the manifest
    (and refused as JSON, not retried)."""
    # The deadline falls between two drips (at 1.0 and 1.2 s), so the watchdog's cut, not the
    # next byte's check of the clock, ends the read.
    shard_set = remote(dripping_server, tmp_path / "cache", attempts=1, deadline_s=1.1)
    with pytest.raises(HarnessError, match=r"manifest\.json: took longer than 1.1 s; stopped reading \(after 1 attempt\)"):
        with shard_set.fetched_manifest():
            pass


def trickling_stream(server, shards, tmp_path):
    """A stream whose second macro-batch is shard 1, which the server sends over 30 s."""
    import torch

    from harness.data.shard_set import ShardSource, ShardSplit
    from harness.data.stream import MacroBatchStream

    server.fail("train-000001.tar", "trickle", count=1)
    source = ShardSource(server.url, tmp_path / "cache")
    return MacroBatchStream(ShardSplit(source, "train"), 20, 80, seed=0, device=torch.device("cpu"), shuffle=False)


@pytest.mark.parametrize("where", ["prepare", "load_next"])
def test_a_stop_cuts_short_the_wait_for_a_macro_batch_that_downloads(server, shards, tmp_path, where):
    """The Trainer waits for a macro-batch's load (at start-up in prepare, else in load_next
    at the sync point before it) only until a stop signal comes, which `give_up` stands in
    for here: the stop is then agreed on at that sync point, not after a download that can
    outlast a launcher's grace period. Shard 1 takes 30 s; the wait ends 1 s in, 0.1 s after
    give_up turns true (its polling interval), and 5 s leaves room for a slow machine."""
    stream = trickling_stream(server, shards, tmp_path)
    try:
        if where == "load_next":
            next(stream.epoch(0))  # macro-batch 0 is shard 0; shard 1's is the next to load
        started = time.monotonic()
        if where == "prepare":
            stream.prepare(0, 1, give_up=lambda: time.monotonic() > started + 1)
        else:
            stream.load_next(give_up=lambda: time.monotonic() > started + 1)
        assert 1 <= time.monotonic() - started < 5 and server.gets("train-000001.tar") == 1
    finally:
        closing = time.monotonic()
        stream.close()
        assert time.monotonic() - closing < 10  # as in the test above


def sigterm_during(command: list, started: Callable[[], bool], what: str) -> tuple[int, str, float]:
    """Run `command`, wait for `started()` (a download it makes), send SIGTERM 1 s into it;
    the exit status, the output, and the seconds from the signal to the exit."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: started() or process.poll() is not None, 60, what)
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(1.0)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
        return process.returncode, output, time.monotonic() - signalled
    finally:
        kill_tree(process)  # torchrun's ranks too, which run in sessions of their own


@pytest.mark.timeout(240)
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_while_a_shard_downloads_stops_at_once_with_a_checkpoint(server, shards, tmp_path, nproc):
    """A SIGTERM while the next macro-batch's shard downloads: the run stops within seconds,
    checkpointed at the sync point that ends the macro-batch before it, and resumes from
    there. Before, the stop waited for the download (30 s here; up to 5 attempts of 30 min
    with a stalled server), past torchrun's 30 s grace period and Slurm's KillWait.

    The cache holds one shard a rank (the ranks of a node share it: one downloads a shard
    while the other waits for its lock), so every macro-batch (one 80-image shard, 4 steps
    of 20) downloads its shard. Once the run has fetched a shard for training, every later GET
    trickles (30 s a shard); the SIGTERM comes 1 s into one. The stop (checkpoint, stop
    record, the process's exit) took 1.5 s from the signal on a quiet 2-core Xeon with one
    process, and 6.9 s (one process) and 4.1 s (torchrun, which forwards the signal to its two
    ranks) with the machine's both cores busy with other tests; 20 s leaves room for a slower
    machine. The old code took 29 s (one process): the rest of the download, then the stop.
    torchrun's own exit status does not pass the ranks' 75 on: stopped.json says the run
    stopped."""
    from helpers import train_command

    names = [s["name"] for s in train_shards(shards)]
    limit_gb = max(s["bytes"] for s in train_shards(shards)) * (nproc + 0.2) / 1e9
    run_dir = tmp_path / "run"
    command = train_command(server.url, run_dir, "--model", "mlp", "--hidden", "32", "--device", "cpu", "--batch-size", "20",
                            "--macro-batch", "80", "--epochs", "30", "--threads", "1", "--shard-cache", tmp_path / "cache",
                            "--shard-cache-limit-gb", f"{limit_gb:.12f}", nproc=nproc)

    def train_gets() -> int:
        return sum(server.gets(name) for name in names)

    trickling_since: list[int] = []  # the training GETs made before every later one trickles

    def trickling() -> bool:
        """Once the run fetches a shard for training (start-up checked each once), every later
        GET trickles; true once one has begun."""
        if not trickling_since and train_gets() > len(names):
            for name in names:
                server.fail(name, "trickle")
            trickling_since.append(train_gets())
        return bool(trickling_since) and train_gets() > trickling_since[0]

    returncode, output, took = sigterm_during(command, trickling, "a trickling training download")
    assert returncode == (75 if nproc == 1 else 1), output[-3000:]
    assert took < 20, f"the stop took {took:.1f} s"
    step = json.loads((run_dir / "stopped.json").read_text())["step"]
    assert step % 10 in (0, 4, 8) and (run_dir / "checkpoints" / f"step-{step:08d}.pt").is_file(), step  # a macro-batch's end

    server.server.faults.clear()
    resumed = run(command, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step-{step:08d}.pt (epoch {step // 10 + 1}, step {step})" in resumed.stdout, resumed.stdout[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 300


@pytest.mark.timeout(240)
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_while_the_manifest_is_fetched_stops_before_training(server, shards, tmp_path, nproc):
    """A SIGTERM while the manifest itself arrives (30 s here; a stalled server could hold
    it through every retry) stops the run within seconds, before training, with the stop
    record a requeue goes by; the rerun trains. With two ranks only the first GET is
    slow: the other rank, which has its manifest, stops with the one whose fetch was cut,
    as every rank decides alike. Before, the stop waited for the manifest (28.5 s)."""
    from helpers import train_command

    server.fail("manifest.json", "trickle", count=1)
    run_dir = tmp_path / "run"
    command = train_command(server.url, run_dir, "--model", "mlp", "--hidden", "32", "--device", "cpu", "--batch-size", "20",
                            "--epochs", "1", "--threads", "1", "--shard-cache", tmp_path / "cache", nproc=nproc)
    returncode, output, took = sigterm_during(command, lambda: server.gets("manifest.json") > 0, "the manifest's fetch")
    assert returncode == (75 if nproc == 1 else 1), output[-3000:]
    assert took < 20, f"the stop took {took:.1f} s"  # as in the test below
    assert json.loads((run_dir / "stopped.json").read_text()) == {"step": 0, "signal": "SIGTERM"}
    assert output.count("SIGTERM: stopped at step 0 before training, with nothing new to checkpoint; run again to resume") == 1, output[-3000:]
    assert "error:" not in output, output[-3000:]

    resumed = run(command, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run_dir / "stopped.json").exists()


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("nproc", "slow_shard", "options"), [
    (1, "train-000001.tar", []),
    (2, "train-000001.tar", []),
    (1, "test-000000.tar", ["--holdout", "40"]),  # the test split, which a holdout run also loads at start-up
])
def test_sigterm_while_start_up_downloads_the_shards_stops_before_training(server, shards, tmp_path, nproc, slow_shard, options):
    """A SIGTERM while start-up fetches the shards into an empty cache (the training shards
    to hash them, the test split to hold it) stops the run within seconds, before training,
    with the stop record a requeue goes by, and without taking the cut download for a
    damaged shard; the rerun fetches the shard again and trains. The shard takes 30 s to
    arrive, and the signal comes 1 s into it. The stop took 1.2 s (one process) and 2.1 s
    (torchrun, two ranks) from the signal on a 2-core Xeon; 20 s leaves room for a slower
    or busier machine (the other test's stop took 4-5x longer with both cores busy). The
    old code took 29.3 s and 29.6 s: it waited for the download (with --holdout, 29 s too:
    the test split was loaded after start-up's stop check, before the first epoch)."""
    from helpers import train_command

    server.fail(slow_shard, "trickle", count=1)
    run_dir = tmp_path / "run"
    command = train_command(server.url, run_dir, "--model", "mlp", "--hidden", "32", "--device", "cpu", "--batch-size", "20",
                            "--epochs", "1", "--threads", "1", "--shard-cache", tmp_path / "cache", *options, nproc=nproc)
    returncode, output, took = sigterm_during(command, lambda: server.gets(slow_shard) > 0, f"{slow_shard}'s download")
    assert returncode == (75 if nproc == 1 else 1), output[-3000:]
    assert took < 20, f"the stop took {took:.1f} s"
    assert json.loads((run_dir / "stopped.json").read_text()) == {"step": 0, "signal": "SIGTERM"}
    assert "SIGTERM: stopped at step 0 before training" in output and "manifest" not in output, output[-3000:]

    resumed = run(command, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert server.gets(slow_shard) == 2

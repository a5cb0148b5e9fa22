"""Shard sets served from a URL (or a command), fetched into a local cache as needed.

`--shards https://host/mnist/` or `--shards 'pipe:gsutil cat gs://bucket/mnist/{name}'`
names a shard set that is not on a local disk. Its manifest.json is fetched on every run
(it is small and may change) into a directory of the process's own, where
`load_manifest` checks it as it checks a local one. The shards are then fetched one at a time, when the reader
needs them, and checked against that manifest: the size is a cap while reading (a server
that says or sends more is cut off), the SHA-256 is computed as the bytes arrive, and a
file is renamed into place only when both match, so the cache never holds a partial or
wrong file under a real name. Cached shards are named by their SHA-256, so a shard set
that changes never reuses a stale file; the least recently used are evicted to keep the
cache under `--shard-cache-limit-gb`.

Networks fail: a refused or dropped connection, a timeout, HTTP 5xx or 429 (and a
command that exits non-zero) are retried with exponential backoff; a wrong size, a wrong
digest or another HTTP 4xx would only fail again, so they fail at once. Each retry is
a warning line; every failure is one HarnessError naming the URL (or command).

The ranks on one node share a cache directory: a per-shard `flock` makes one of them
download a shard while the others wait and then find it cached. They wait as long as the
download moves (its part file changes), at most `lock_timeout_s`: a holder that is stopped
(SIGSTOP, a hung disk, a deadlock) is given up on once its part file has been still for
`stall_s`, not after the hours a whole download may take. Lock files (empty) stay in the
cache; deleting them safely would race with a waiter. gs://, sftp://, ftps:// and scp://
locations run the commands webdataset's gopen runs for them (gsutil, curl). `file://` URLs
are not remote: ShardSource reads the path.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import logging
import os
import re
import select
import shlex
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from harness.data.download import CHUNK, Watchdog, open_watched
from harness.data.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES
from harness.errors import HarnessError
from harness.validation import one_line

log = logging.getLogger("harness")

PIPE = "pipe:"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")  # a plain file name: no '/', no leading '.'
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
CACHED_NAME = re.compile(r"^[0-9a-f]{64}-[A-Za-z0-9_-][A-Za-z0-9._-]*$")  # what cached_path names; nothing else is evicted
LIMIT_OPTION = "--shard-cache-limit-gb"
NOT_RETRIED_EXITS = (126, 127)  # the shell's "not executable" and "command not found"


# The other URL forms webdataset's gopen reads, as the commands it runs for them; the
# location (the user's own text) is shell-quoted, and {name} becomes a checked plain name.
COMMAND_SCHEMES = {"gs://": "gsutil cat", "sftp://": "curl -f -s -L", "ftps://": "curl -f -s -L", "scp://": "curl -f -s -L"}


def is_remote(location) -> bool:
    """True for http(s):// URLs, `pipe:COMMAND` and the COMMAND_SCHEMES; False for a local
    path (and file:// URLs)."""
    location = str(location)
    return location.startswith(PIPE) or location.lower().startswith(("http://", "https://", *COMMAND_SCHEMES))


def as_fetchable(location: str) -> str:
    """An http(s):// or pipe: location for `location`: gs://BUCKET/PATH/ becomes
    `pipe:gsutil cat 'gs://BUCKET/PATH/'{name}`, as webdataset's gopen would run it."""
    for scheme, command in COMMAND_SCHEMES.items():
        if location.lower().startswith(scheme):
            return f"{PIPE}{command} {shlex.quote(location.rstrip('/') + '/')}{{name}}"
    return location


class _Failure(Exception):
    """One attempt's problem; `transient` ones are retried."""

    def __init__(self, problem: str, transient: bool):
        super().__init__(problem)
        self.transient = transient


def lock_path(cached: Path) -> Path:
    """The lock file of a cached shard: held by whoever downloads it."""
    return cached.with_name(f".{cached.name}.lock")


def part_path(cached: Path) -> Path:
    """Where a cached shard is written before it is checked and renamed into place."""
    return cached.with_name(f".{cached.name}.part")


def _is_part_file(path: Path) -> bool:
    """One of part_path's files: the cache's shards/ folder may hold a user's own .part files
    (--shard-cache ~, say), which are not the cache's to remove."""
    name = path.name
    return name.startswith(".") and name.endswith(".part") and bool(CACHED_NAME.match(name[1 : -len(".part")])) and path.is_file()


class RemoteShards:
    """The shard set at `base`, cached in `cache_dir` (see the module docstring).

    `timeout_s` bounds each network (or command output) wait, `deadline_s` one attempt at
    one file; transient failures are tried `attempts` times in all, waiting
    backoff_s * 2**k after the k-th. `cache_limit_bytes` bounds all the shards cached in
    `cache_dir`, from any location (None: no limit). `lock_timeout_s` bounds the wait for
    another process's download of the same shard (default: that download's worst case);
    the wait ends sooner, after `stall_s`, if that download stops moving (see _flock).
    """

    def __init__(
        self, base: str, cache_dir: Path, cache_limit_bytes: int | None = None, timeout_s: float = 60.0, attempts: int = 5,
        backoff_s: float = 0.5, lock_timeout_s: float | None = None, deadline_s: float = 1800.0,
    ):
        if not is_remote(base):
            raise HarnessError(f"{base}: not an http://, https://, {', '.join(COMMAND_SCHEMES)} or pipe: location")
        base = as_fetchable(base)
        if base.startswith(PIPE) and "{name}" not in base:
            raise HarnessError(
                f"{base}: a pipe: location needs {{name}} where the file name goes, e.g. 'pipe:gsutil cat gs://bucket/mnist/{{name}}'"
            )
        if attempts < 1:
            raise HarnessError(f"{base}: attempts must be at least 1, not {attempts}")
        if cache_limit_bytes is not None and cache_limit_bytes <= 0:
            raise HarnessError(f"{LIMIT_OPTION}: the shard cache limit must be positive, not {cache_limit_bytes} bytes")
        self.base, self.cache_dir, self.cache_limit_bytes = base, Path(cache_dir), cache_limit_bytes
        self.timeout_s, self.attempts, self.backoff_s = timeout_s, attempts, backoff_s
        # By default a waiter outlasts the worst case of the download it waits for.
        worst_download = attempts * deadline_s + backoff_s * 2**attempts
        self.lock_timeout_s, self.deadline_s = worst_download if lock_timeout_s is None else lock_timeout_s, deadline_s
        # The longest a live download may leave its part file unwritten (a waiter gives up on
        # it after that): every attempt silent (connecting, the headers and the first read of
        # the body each wait up to timeout_s), and the backoffs between them. 907.5 s by
        # default: a holder that rides out a 15-minute outage is still waited for.
        self.stall_s = attempts * 3 * timeout_s + sum(backoff_s * 2**k for k in range(attempts - 1))
        self.shard_dir = self.cache_dir / "shards"
        self.bytes_fetched = 0  # bytes received over the network (or from the command) by this object
        self.cancelled = threading.Event()  # see fetches_cancelled

    @contextmanager
    def fetches_cancelled(self) -> Iterator[None]:
        """Within: a fetch on another thread gives up at its next chunk, read timeout, retry
        or lock poll, with a HarnessError. After (if the body ended normally): fetches work
        again. An exception in the body (a second Ctrl-C) leaves them cancelled, so that a
        fetch still running then does not go on."""
        self.cancelled.set()
        yield
        self.cancelled.clear()

    @contextmanager
    def fetches_cancelled_when(self, asked: Callable[[], bool]) -> Iterator[None]:
        """Within: fetches, on this thread too, are cancelled (as by fetches_cancelled) once
        `asked()` is true, a stop signal at start-up; they stay cancelled after. A thread
        looks every 0.1 s, since a signal handler must not set the event itself: it could
        run on this thread while the thread is inside the event's lock."""
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.1):
                if asked():
                    self.cancelled.set()
                    return

        watcher = threading.Thread(target=watch, name="harness-stop-watch", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()

    def _check_cancelled(self, url: str) -> None:
        if self.cancelled.is_set():
            raise HarnessError(f"{url}: fetch cancelled (the run is ending)")

    def location(self, name: str) -> str:
        """The URL (or the command, as `pipe:COMMAND`) of file `name` of the set."""
        if not NAME_PATTERN.match(name):
            raise HarnessError(f"{self.base}: {name!r} is not a plain file name; not fetched")
        if self.base.startswith(PIPE):
            return self.base.replace("{name}", name)
        return self.base.rstrip("/") + "/" + name

    @contextmanager
    def fetched_manifest(self) -> Iterator[Path]:
        """A directory holding a fresh copy of the set's manifest.json (not yet checked:
        `load_manifest` on it does that), this process's own: ranks that share the cache
        must each read what they fetched, or a set republished while a job starts would
        go unseen. Removed on leaving."""
        _make_dir(self.cache_dir)
        try:
            directory = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=".manifest-"))
        except OSError as e:
            raise HarnessError(f"{self.cache_dir}: cannot create the shard cache directory ({e.strerror or e})") from None
        try:
            (directory / MANIFEST_NAME).touch()  # _fetch writes into an existing file
            self._fetch(MANIFEST_NAME, directory / MANIFEST_NAME, MAX_MANIFEST_BYTES, None)
            yield directory
        finally:
            (directory / MANIFEST_NAME).unlink(missing_ok=True)
            directory.rmdir()

    def cached_path(self, name: str, sha256: str) -> Path:
        """Where shard `name` with this SHA-256 is (or would be) cached."""
        url = self.location(name)  # checks the name
        if not SHA256_PATTERN.match(sha256):
            raise HarnessError(f"{url}: {sha256!r} is not a SHA-256 (64 lowercase hex digits)")
        return self.shard_dir / f"{sha256}-{name}"

    def shard_path(self, name: str, size: int, sha256: str) -> Path:
        """A local file holding shard `name`: `size` bytes with this SHA-256 (from the checked
        manifest). Fetched unless cached; a cached one is marked as recently used."""
        cached = self.cached_path(name, sha256)
        if self.cache_limit_bytes is not None and size > self.cache_limit_bytes:
            raise HarnessError(
                f"{self.location(name)}: the shard is {size} bytes, more than the whole shard cache "
                f"({LIMIT_OPTION} allows {self.cache_limit_bytes} bytes); raise {LIMIT_OPTION}"
            )
        if _touch_if_complete(cached, size):
            return cached
        _make_dir(self.shard_dir)
        with self._flock(lock_path(cached), f"downloading {name}", part_path(cached)):
            if _touch_if_complete(cached, size):  # another process fetched it while this one waited
                return cached
            part = part_path(cached)
            try:
                self._reserve(part, size, name)
                self._fetch(name, part, size, sha256)
                _replace(part, cached)
            finally:
                part.unlink(missing_ok=True)
        return cached

    # --- the cache ------------------------------------------------------------------------------

    @contextmanager
    def _flock(self, path: Path, doing: str, part: Path | None = None) -> Iterator[None]:
        """Hold an exclusive flock on `path`. HarnessError after lock_timeout_s of waiting, or
        once the holder has stopped: its `part` file has not changed for stall_s. Without a
        part (the eviction lock, held only to scan the cache and evict, which takes well
        under a second), once it has been held for stall_s."""
        now = time.monotonic()
        deadline, holder = now + self.lock_timeout_s, _PartWatch(part, now)
        try:
            f = open(path, "ab")  # noqa: SIM115 (closed by the with below; opened here so that an OSError names the file)
        except OSError as e:
            raise HarnessError(f"{path}: cannot open the shard cache's lock file ({e.strerror or e})") from None
        with f:
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if now > deadline:
                        raise HarnessError(
                            f"{path}: another process has held this lock for over {self.lock_timeout_s:g} s "
                            f"(while {doing}); is it stuck? (a lock is released when its process exits)"
                        ) from None
                    if holder.still_for(now) > self.stall_s:
                        raise HarnessError(self._stuck_holder(path, doing, part)) from None
                    if self.cancelled.wait(0.05):
                        self._check_cancelled(str(path))
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _stuck_holder(self, path: Path, doing: str, part: Path | None) -> str:
        if part is None:
            still = f"another process has held this lock for over {self.stall_s:g} s, though it takes it only to scan the cache"
        else:  # a live download writes to its part file more often than that
            still = f"the process holding this lock has not written to {part} for over {self.stall_s:g} s"
        return (
            f"{path}: {still} (while {doing}); it is stuck (stopped, or on a hung disk or network): end it "
            f"(`lsof {path}` shows it, with W after its FD; its lock goes when it exits) and run again"
        )

    def _reserve(self, part: Path, size: int, name: str) -> None:
        """Make room for `size` more bytes, evicting least recently used shards, and create
        `part` at its full size (sparse), so that other processes count it while it downloads."""
        try:
            self._make_room(part, size, name)
        except OSError as e:
            raise HarnessError(f"{self.shard_dir}: cannot make room for {name} in the shard cache ({e.strerror or e})") from None

    def _make_room(self, part: Path, size: int, name: str) -> None:
        if self.cache_limit_bytes is None:
            part.touch()
            return
        with self._flock(self.shard_dir / ".cache.lock", "evicting from the shard cache"):
            cached, in_flight = self._usage(part)
            total = sum(st.st_size for _, st in cached) + in_flight
            for path, st in sorted(cached, key=lambda entry: entry[1].st_mtime_ns):
                if total + size <= self.cache_limit_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= st.st_size
            if total + size > self.cache_limit_bytes:
                raise HarnessError(
                    f"{self.shard_dir}: no room for {name} ({size} bytes) within {LIMIT_OPTION} "
                    f"({self.cache_limit_bytes} bytes): other processes are downloading {in_flight} bytes into it"
                )
            with open(part, "wb") as f:
                f.truncate(size)

    def _usage(self, own_part: Path) -> tuple[list[tuple[Path, os.stat_result]], int]:
        """The cached shards with their stat, and the bytes reserved by downloads in progress.
        A part file whose lock nobody holds was left by a process that died: it is removed."""
        cached, in_flight = [], 0
        for path in self.shard_dir.iterdir():
            try:
                if CACHED_NAME.match(path.name) and path.is_file():
                    cached.append((path, path.stat()))
                elif _is_part_file(path) and path != own_part:
                    with open(path.with_name(path.name[: -len(".part")] + ".lock"), "ab") as lock:
                        try:
                            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            path.unlink(missing_ok=True)  # nobody is writing it
                            fcntl.flock(lock, fcntl.LOCK_UN)
                        except BlockingIOError:
                            in_flight += path.stat().st_size
            except FileNotFoundError:  # removed by another process meanwhile
                continue
        return cached, in_flight

    # --- fetching -------------------------------------------------------------------------------

    def _fetch(self, name: str, target: Path, cap: int, sha256: str | None) -> None:
        """Write file `name` of the set to `target` (which exists), retrying transient failures.
        With `sha256`, the file must be exactly `cap` bytes with that digest; without, at most `cap`."""
        url = self.location(name)
        for attempt in range(1, self.attempts + 1):
            self._check_cancelled(url)
            try:
                return self._attempt(url, target, cap, sha256)
            except _Failure as e:
                failure = e
            except urllib.error.HTTPError as e:
                failure = _Failure(f"HTTP {e.code} {e.reason}", e.code == 429 or e.code >= 500)
            except urllib.error.URLError as e:
                failure = _Failure(str(e.reason), True)
            except (http.client.HTTPException, OSError) as e:  # dropped, reset, timed out
                failure = _Failure(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, True)
            except ValueError as e:  # a malformed URL
                failure = _Failure(str(e), False)
            if not failure.transient:
                raise HarnessError(f"{url}: {one_line(failure)} (after {attempt} attempt{'s' * (attempt > 1)}; not retried)")
            if attempt < self.attempts:
                # Said at once: a server that never answers costs minutes over all the
                # attempts (each waits up to timeout_s for the connection, the headers and
                # the first bytes), and a user should see why the run is waiting.
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning(f"{url}: {one_line(failure)} (attempt {attempt} of {self.attempts}; trying again in {delay:g} s)")
                self.cancelled.wait(delay)
        raise HarnessError(f"{url}: {one_line(failure)} (after {self.attempts} attempt{'s' * (self.attempts > 1)})")

    def _attempt(self, url: str, target: Path, cap: int, sha256: str | None) -> None:
        deadline = time.monotonic() + self.deadline_s
        opened = self._pipe(url[len(PIPE) :], deadline) if url.startswith(PIPE) else self._http(url, deadline)
        with opened as (chunks, length), open(target, "r+b") as out:
            if length is not None and (length != cap if sha256 else length > cap):
                raise _Failure(f"Content-Length {length}; {'the manifest says' if sha256 else 'the limit is'} {cap} bytes", False)
            digest, size = hashlib.sha256(), 0
            for chunk in chunks:
                self._check_cancelled(url)
                size += len(chunk)
                self.bytes_fetched += len(chunk)
                if size > cap:
                    raise _Failure(f"sent more than {'the manifest' if sha256 else 'the limit'}'s {cap} bytes; stopped reading", False)
                _write(out, chunk, target)
                digest.update(chunk)
            expected = cap if sha256 else length
            if expected is not None and size != expected:
                raise _Failure(f"ended after {size} of {expected} bytes", True)
            if sha256 and digest.hexdigest() != sha256:
                raise _Failure(f"SHA-256 {digest.hexdigest()} does not match the manifest's {sha256}", False)
            _write(out, None, target)

    @contextmanager
    def _http(self, url: str, deadline: float):
        """(chunks, Content-Length or None) of an HTTP GET; a timeout per read and a deadline,
        which (with a cancel) also cuts a read in progress: see download.Watchdog."""
        with Watchdog(deadline, self.cancelled) as watchdog:
            try:
                with open_watched(url, self.timeout_s, watchdog) as response:
                    length = response.headers.get("Content-Length")

                    def chunks():
                        while chunk := response.read1(CHUNK):
                            if time.monotonic() > deadline:
                                raise _Failure(f"took longer than {self.deadline_s:g} s; stopped reading", True)
                            yield chunk
                        # A socket the watchdog shut reads as the end of the body: a body cut
                        # short, not a whole one (a manifest has no size to show it).
                        self._raise_if_cut(url, watchdog)

                    yield chunks(), int(length) if length and length.isdigit() else None
            except (OSError, http.client.HTTPException):  # what a read from a shut socket raises
                self._raise_if_cut(url, watchdog)
                raise

    def _raise_if_cut(self, url: str, watchdog: Watchdog) -> None:
        if watchdog.fired == "cancelled":
            raise HarnessError(f"{url}: fetch cancelled (the run is ending)") from None
        if watchdog.fired == "deadline":
            raise _Failure(f"took longer than {self.deadline_s:g} s; stopped reading", True) from None

    @contextmanager
    def _pipe(self, command: str, deadline: float):
        """(chunks, None) of a shell command's output; its exit status is checked at the end,
        and it is killed (with its children) if it is still running when reading stops."""
        with tempfile.TemporaryFile() as stderr:
            process = subprocess.Popen(
                command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True
            )
            try:
                yield self._pipe_chunks(command, process, stderr, deadline), None
            finally:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                process.stdout.close()

    def _pipe_chunks(self, command: str, process: subprocess.Popen, stderr, deadline: float) -> Iterator[bytes]:
        fd = process.stdout.fileno()
        heard = time.monotonic()  # the command's last output, for the silence timeout
        while True:
            self._check_cancelled(f"pipe:{command}")
            now = time.monotonic()
            if now > deadline:
                raise _Failure(f"took longer than {self.deadline_s:g} s; stopped reading", True)
            if now - heard > self.timeout_s:
                raise _Failure(f"no output for {self.timeout_s:g} s; stopped reading", True)
            # waits of 0.1 s at most, so that a cancel (a stopping run's close) is seen at once,
            # not after the silence timeout (60 s by default)
            if not select.select([fd], [], [], 0.1)[0]:
                continue
            chunk = os.read(fd, CHUNK)
            if not chunk:
                break
            yield chunk
            heard = time.monotonic()  # the time the caller took to write the chunk is not the command's silence
        try:
            status = process.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise _Failure(f"the command did not exit within {self.timeout_s:g} s of closing its output", True) from None
        if status != 0:
            stderr.seek(max(0, os.fstat(stderr.fileno()).st_size - 2000))
            said = stderr.read().decode(errors="replace").strip().splitlines()
            raise _Failure(f"command exited with status {status}" + (f": {said[-1]}" if said else ""), status not in NOT_RETRIED_EXITS)


def _write(out, chunk: bytes | None, target: Path) -> None:
    """Write a chunk to `out` (through to the file, so that a waiting process sees it move
    however small the chunks: see _PartWatch), or (None) end the file there and flush it to
    disk. A local problem (a full disk) is not the server's: a HarnessError naming the file,
    not retried."""
    try:
        if chunk is not None:
            out.write(chunk)
            out.flush()
        else:
            out.truncate()
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        raise HarnessError(f"{target}: cannot write ({e.strerror or e})") from None


class _PartWatch:
    """How long the part file that a lock's holder downloads into has been still. Any change
    is progress: its length, its mtime (a reserved part is sparse at full length, so writes
    into it change only that; so do a retry's rewrites), its appearing or going. After the
    body the holder syncs the file and renames it, still for as long as that takes: a disk
    that takes longer than the stall bound over it is taken for a hung one."""

    def __init__(self, part: Path | None, now: float):
        self.part = part
        self.seen, self.since, self.polled = self._look(), now, now

    def still_for(self, now: float) -> float:
        """Polled every 0.05 s. A longer gap is this process's own pause (a suspended job,
        SIGSTOP), which says nothing of the holder: it does not count as stillness."""
        if now - self.polled > 1.0:
            self.since += now - self.polled
        self.polled = now
        seen = self._look()
        if seen != self.seen:
            self.seen, self.since = seen, now
        return now - self.since

    def _look(self) -> tuple[int, int] | None:
        """(length, mtime) of the part file; None if there is none."""
        try:
            st = self.part.stat() if self.part else None
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns) if st else None


def _replace(part: Path, cached: Path) -> None:
    try:
        os.replace(part, cached)
    except OSError as e:
        raise HarnessError(f"{cached}: cannot move the checked download into place ({e.strerror or e})") from None


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HarnessError(f"{directory}: cannot create the shard cache directory ({e.strerror or e})") from None


def _touch_if_complete(cached: Path, size: int) -> bool:
    """Whether `cached` is there with the right size; if so, mark it as just used."""
    try:
        if cached.stat().st_size != size:
            return False
        os.utime(cached)
        return True
    except OSError:  # not there (or evicted meanwhile); a cache that cannot be made is reported by the caller
        return False

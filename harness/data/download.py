"""Download MNIST from the standard public mirrors, checking each file as it arrives.

Every file is checked against what is published about it: its size, its SHA-256 and
its MD5 (the MD5s are what the original distribution published; the SHA-256s are of
those same files). The size is a cap while reading: a mirror that sends more is cut off
at once, and one whose Content-Length says more is not read at all. The digests are
computed on the fly; a file is renamed into place only when all of them match, so the
destination never holds a partial or wrong file under the real name. The https mirrors
come first; the plain-http one is a last resort whose bytes must match the same digests.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import itertools
import os
import re
import selectors
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from harness.errors import HarnessError
from harness.leftovers import remove_dead_leftovers

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# The published MD5 of each gzip file of the original distribution.
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# The SHA-256 and size of the same files.
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
MNIST_BYTES = {
    "train-images-idx3-ubyte.gz": 9912422,
    "train-labels-idx1-ubyte.gz": 28881,
    "t10k-images-idx3-ubyte.gz": 1648877,
    "t10k-labels-idx1-ubyte.gz": 4542,
}
CHUNK = 1 << 16


@dataclass(frozen=True)
class Published:
    """What is published about one file: its size in bytes and its digests (None where a
    digest is not published; at least one must be)."""

    bytes: int
    sha256: str | None = None
    md5: str | None = None

    def __post_init__(self):
        if not (self.sha256 or self.md5):
            raise ValueError("a downloaded file needs a published SHA-256 or MD5 to be checked against")

    def problem(self, size: int, digests: dict[str, str]) -> str | None:
        """How a file of `size` bytes with `digests` differs from this; None if it does not."""
        if size != self.bytes:
            return f"{size} bytes; the published size is {self.bytes}"
        for name, published in (("SHA-256", self.sha256), ("MD5", self.md5)):
            if published and digests[name] != published:
                return f"{name} {digests[name]} does not match the published {published}"
        return None


MNIST_FILES = {name: Published(MNIST_BYTES[name], MNIST_SHA256[name], MNIST_MD5[name]) for name in MNIST_MD5}


def digests_of(path: Path) -> dict[str, str]:
    hashes = {"SHA-256": hashlib.sha256(), "MD5": hashlib.md5()}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            for h in hashes.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashes.items()}


class Watchdog:
    """Cuts one download's connections (shuts their sockets down, so that a read blocked on
    another thread returns at once) when its deadline passes or `cancelled` is set.

    urlopen's timeout bounds each read only, and the body's loop looks at the deadline
    between chunks: a server that sends the status line and then a header (or, chunked, a
    chunk-size line) a byte at a time, each within the timeout, held urlopen or read1 for
    hours, past the deadline and deaf to a cancel (`fired` then says which cut it)."""

    def __init__(self, deadline: float, cancelled: threading.Event | None = None):
        self.deadline, self.cancelled = deadline, cancelled or threading.Event()
        self.fired = ""  # "deadline" or "cancelled", once the connections are cut
        self._sockets: list[socket.socket] = []  # duplicates: valid until closed here, whatever urllib does
        self._lock, self._done = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._watch, name="harness-download-watchdog", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        for sock in self._sockets:
            sock.close()

    def connect(self, address: tuple[str, int], timeout: float | None, source_address=None) -> socket.socket:
        """socket.create_connection(address, timeout, source_address), watched, and cut at
        once by the deadline or a cancel while it looks the name up or connects: to a host
        that drops connection requests (a firewall, a network that is down) each address
        took the whole timeout, deaf to a stopping run's cancel."""
        host, port = address
        if not isinstance(timeout, (int, float)):  # http.client's "the socket module's default"
            timeout = socket.getdefaulttimeout()
        infos = self._unless_cut(lambda: socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM), f"looking up {host}")
        error: OSError = OSError(f"no address found for {host}")
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                if source_address:
                    sock.bind(source_address)
                self._connect(sock, sockaddr, timeout)
                sock.settimeout(timeout)
                return self.watch(sock)
            except OSError as e:
                sock.close()
                if self.fired:
                    raise
                error = e
        raise error

    def _connect(self, sock: socket.socket, sockaddr, timeout: float | None) -> None:
        """A non-blocking connect, waited for in slices of 0.05 s between which the cut is looked at."""
        sock.setblocking(False)
        waiting = sock.connect_ex(sockaddr)
        give_up = None if timeout is None else time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_WRITE)
            while waiting in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK, errno.EINTR):
                self._raise_if_cut(f"connecting to {sockaddr[0]}")
                if give_up is not None and time.monotonic() > give_up:
                    raise TimeoutError("timed out")  # what socket.create_connection raises
                if selector.select(0.05):
                    waiting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if waiting:
            raise OSError(waiting, os.strerror(waiting))

    def _unless_cut(self, call, doing: str):
        """call() on a daemon thread (a name lookup cannot be interrupted), waited for until the cut."""
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["value"] = call()
            except BaseException as e:  # handed to the caller
                outcome["error"] = e

        thread = threading.Thread(target=run, name="harness-name-lookup", daemon=True)
        thread.start()
        while thread.is_alive():
            self._raise_if_cut(doing)
            thread.join(0.05)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _raise_if_cut(self, doing: str) -> None:
        if self.fired:  # the callers tell a cut from other failures by `fired`
            raise OSError(f"stopped {doing} ({'cancelled' if self.fired == 'cancelled' else 'past the deadline'})")

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(socket.socket(fileno=os.dup(sock.fileno())))
            if self.fired:
                _cut(self._sockets[-1])
        return sock

    def _watch(self) -> None:
        while not self._done.wait(0.05):
            if self.cancelled.is_set() or time.monotonic() > self.deadline:
                with self._lock:
                    self.fired = "cancelled" if self.cancelled.is_set() else "deadline"
                    for sock in self._sockets:
                        _cut(sock)
                return


def _cut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by the other side
        pass


def open_watched(url: str, timeout_s: float, watchdog: Watchdog):
    """urllib.request.urlopen(url, timeout=timeout_s), its connections (redirects too) made
    by `watchdog`, which cuts them, and the connecting, at its deadline or a cancel."""

    def watched(connection_class):
        class Connection(connection_class):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._create_connection = watchdog.connect

        return Connection

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(watched(http.client.HTTPConnection), req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(watched(http.client.HTTPSConnection), req, context=self._context)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler).open(url, timeout=timeout_s)


def download_mnist(
    dest: Path,
    mirrors: tuple[str, ...] | list[str] = MIRRORS,
    files: dict[str, Published] = MNIST_FILES,
    timeout_s: float = 60.0,
    deadline_s: float = 1800.0,
) -> Path:
    """Fetch every file in `files` into `dest`, trying the mirrors in order.

    A file already in `dest` that matches what is published is kept. `timeout_s` bounds
    each network wait, `deadline_s` a whole file from one mirror (a mirror that trickles
    bytes never hangs the download).
    """
    dest = Path(dest)
    check_download_options(dest, mirrors)
    dest.mkdir(parents=True, exist_ok=True)
    # fetch_checked's part files, .NAME.part-PID, of the files this download writes
    removed = remove_dead_leftovers(dest, re.compile(rf"\.({'|'.join(map(re.escape, files))})\.part-([0-9]+)"))
    if removed:
        print(f"removed {len(removed)} partial download(s) of processes that no longer run: {', '.join(removed)}", flush=True)
    for name, published in files.items():
        target = dest / name
        if target.is_file() and published.problem(target.stat().st_size, digests_of(target)) is None:
            continue
        problems = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            problem = fetch_checked(url, target, published, timeout_s, deadline_s)
            if problem is None:
                break
            problems.append(f"{url}: {problem}")
        else:
            raise HarnessError(f"download of {name} failed on every mirror: " + "; ".join(problems))
    return dest


def check_download_options(dest: Path, mirrors) -> None:
    """Refuse a --download-dir that is a file (or lies under one) and a --mirror that is not a
    URL the download reads, before anything is created: bad options, named as such (exit 2),
    not the OS's or urllib's errors once the folder has been made."""
    for path in (dest, *dest.parents):
        if path.exists():
            if not path.is_dir():
                raise HarnessError(f"--download-dir {dest}: {'' if path == dest else f'{path} is '}not a directory")
            break
    for mirror in mirrors:
        try:
            url = urllib.parse.urlsplit(mirror)
            usable = url.scheme in ("http", "https", "file") and (url.scheme == "file" or bool(url.hostname))
        except ValueError:  # an unclosed [IPv6 address, say
            usable = False
        if not usable:
            raise HarnessError(f"--mirror {mirror}: not an http://, https:// or file:// URL")


def fetch_checked(url: str, target: Path, published: Published, timeout_s: float, deadline_s: float) -> str | None:
    """Download `url` to `target` if it is the published file; otherwise what was wrong. A
    file already at `target` (download_mnist keeps one that is the published file) is moved
    aside, not overwritten: a --download-dir may hold a user's own file of that name
    (Fashion-MNIST's files have MNIST's names)."""
    tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
    deadline = time.monotonic() + deadline_s
    try:
        with Watchdog(deadline) as watchdog:
            try:
                with open_watched(url, timeout_s, watchdog) as response, open(tmp, "wb") as out:
                    problem, size, digests = _stream(response, out, published, deadline, deadline_s)
                problem = problem or published.problem(size, digests)
            except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError, ValueError) as e:
                problem = str(e)
        if problem and watchdog.fired:  # whatever the cut read raised, or the short file it left
            problem = f"took longer than {deadline_s:g} s; stopped reading"
        if problem:
            return problem
        _set_aside(target)
        os.replace(tmp, target)
        return None
    finally:
        # Whatever ended it (a problem, Ctrl-C, the harness's Terminated): no part file is
        # left behind. After the rename there is none.
        tmp.unlink(missing_ok=True)


def _set_aside(target: Path) -> None:
    """Rename a file at `target` to NAME.set-aside-TIME (-2, -3, ...: a name of its own), and say so."""
    if not os.path.lexists(target):
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        aside = target.with_name(f"{target.name}.set-aside-{stamp}{f'-{n}' if n > 1 else ''}")
        if not os.path.lexists(aside):
            break
    try:
        os.rename(target, aside)
    except OSError as e:
        raise HarnessError(f"{target}: is not the published file, and cannot be moved aside to {aside.name} ({e.strerror or e}); move it") from None
    print(f"{target}: not the published file; moved to {aside.name}, and the published one downloaded in its place", flush=True)


def _stream(response, out, published: Published, deadline: float, deadline_s: float) -> tuple[str | None, int, dict]:
    """Copy the response to `out`, hashing as it goes; stop at the first byte past the
    published size or at the deadline. Returns (problem or None, bytes, digests)."""
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) != published.bytes:
        return f"Content-Length {length}; the published size is {published.bytes}", 0, {}
    hashes, size = {"SHA-256": hashlib.sha256(), "MD5": hashlib.md5()}, 0
    while chunk := response.read1(CHUNK):
        size += len(chunk)
        if size > published.bytes:
            return f"more than the published {published.bytes} bytes; stopped reading", size, {}
        if time.monotonic() > deadline:
            return f"took longer than {deadline_s:g} s; stopped reading", size, {}
        out.write(chunk)
        for h in hashes.values():
            h.update(chunk)
    return None, size, {name: h.hexdigest() for name, h in hashes.items()}

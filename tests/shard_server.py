"""A loopback HTTP server for shard sets, which fails on request (tests of remote shards)."""

from __future__ import annotations

import http.server
import math
import threading
import time
from pathlib import Path


class Handler(http.server.BaseHTTPRequestHandler):
    """GET /set/NAME: the file NAME of the server's root, or a fault (see ShardServer.fail)."""

    timeout = 10  # a stuck client never holds a server thread for long

    def do_GET(self):  # http.server calls it by this name
        server = self.server
        prefix, _, name = self.path.rpartition("/")
        with server.lock:
            server.requests.append(name)
            kind, count = server.faults.get(name, (None, 0))
            kind = kind if server.requests.count(name) <= count else None
        path = server.root / (name + ".alt" if kind == "alt" else name)
        if prefix != "/set" or not path.is_file() or kind in (404, 503, 429):
            self.send_error(kind if kind in (503, 429) else 404)
            return
        body = path.read_bytes()
        try:
            self.send_faulty(body, kind)
        except OSError:  # the client hung up, as it should on some faults
            pass

    def send_faulty(self, body: bytes, kind) -> None:
        if kind == "silent":  # each wait just inside a 0.5 s timeout: the headers, then no body at all
            time.sleep(0.4)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.flush()
            time.sleep(0.4)
            return
        if kind == "flip":
            body = body[:100] + bytes([body[100] ^ 1]) + body[101:]
        self.send_response(200)
        if kind != "long":  # "long": no Content-Length, and more bytes than the file
            self.send_header("Content-Length", str(len(body) + (kind == "wrong-length")))
        self.end_headers()
        if kind in ("stall", "slow"):
            time.sleep(1.0 if kind == "stall" else 0.5)
        if kind == "trickle":  # a live server far too slow: the whole file takes 30 s
            for piece in range(30):
                self.wfile.write(body[piece * len(body) // 30 : (piece + 1) * len(body) // 30])
                self.wfile.flush()
                time.sleep(1.0)
            return
        if kind == "drop":  # promise the whole file, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            return
        self.wfile.write(body + (bytes(1000) if kind == "long" else b""))

    def log_message(self, *args):
        pass


class ShardServer:
    """A ThreadingHTTPServer on 127.0.0.1 (an ephemeral port) serving the files of `root`."""

    def __init__(self, root: Path):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.root, self.server.requests, self.server.faults = Path(root), [], {}
        self.server.lock = threading.Lock()
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/set/"

    def fail(self, name: str, kind, count: float = math.inf) -> None:
        """Answer the first `count` GETs of `name` with fault `kind`: 404, 429, 503, 'drop',
        'flip' (one byte changed), 'long', 'wrong-length', 'stall' (1 s before the body), 'slow' (0.5 s),
        'silent' (the headers after 0.4 s, then 0.4 s later a hang-up with no body),
        'trickle' (the body in 30 pieces a second apart) or 'alt' (the file NAME.alt instead: a set republished between two GETs)."""
        self.server.faults[name] = (kind, count)

    def gets(self, name: str) -> int:
        with self.server.lock:
            return self.server.requests.count(name)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

"""MNIST download against a loopback HTTP server that the tests start themselves."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, assert_one_error, cli, idx_bytes, run_cli, wait_for

from harness.cli import main as cli_main
from harness.data.download import MIRRORS, MNIST_FILES, MNIST_MD5, MNIST_SHA256, Published, download_mnist
from harness.data.sources import load_source
from harness.errors import HarnessError

NO_PROXY = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


class Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10  # socket timeout: a stuck client never hangs the server thread

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        with server.lock:
            server.requests.append(self.path)
        body = server.routes.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if self.path in server.endless:
            # No Content-Length; the body never ends (until the client hangs up).
            self.end_headers()
            self.close_connection = True
            try:
                while True:
                    self.wfile.write(bytes(1 << 16))
            except OSError:
                return
        if self.path in server.slow:
            # The right Content-Length, then one byte every 50 ms.
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                return
            return
        if self.path in server.short:
            # Promise the whole file, send half, hang up: a dropped connection.
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Mirror:
    """A ThreadingHTTPServer on 127.0.0.1, an ephemeral port; `routes` maps URL paths to bodies."""

    def __init__(self):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.routes, self.server.requests, self.server.short = {}, [], set()
        self.server.endless, self.server.slow = set(), set()
        self.server.lock = threading.Lock()
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, prefix: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/{prefix}/"

    def serve(self, prefix: str, files: dict[str, bytes]) -> str:
        self.server.routes.update({f"/{prefix}/{name}": body for name, body in files.items()})
        return self.url(prefix)

    @property
    def requests(self) -> list[str]:
        with self.server.lock:
            return list(self.server.requests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def mirror(monkeypatch):
    for key, value in NO_PROXY.items():
        monkeypatch.setenv(key, value)
    server = Mirror()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def generated():
    """A small MNIST-like set under the official file names, with its own table of sizes and digests."""
    rng = np.random.default_rng(3)
    files = {
        "train-images-idx3-ubyte.gz": idx_bytes(rng.integers(0, 256, (90, 28, 28)), gz=True),
        "train-labels-idx1-ubyte.gz": idx_bytes(rng.integers(0, 10, 90), gz=True),
        "t10k-images-idx3-ubyte.gz": idx_bytes(rng.integers(0, 256, (30, 28, 28)), gz=True),
        "t10k-labels-idx1-ubyte.gz": idx_bytes(rng.integers(0, 10, 30), gz=True),
    }
    return files, {name: published(body) for name, body in files.items()}


def published(body: bytes, sha256: bool = True, md5: bool = True) -> Published:
    return Published(len(body), hashlib.sha256(body).hexdigest() if sha256 else None, hashlib.md5(body).hexdigest() if md5 else None)


def no_partial_files(directory: Path) -> bool:
    return not [p.name for p in directory.iterdir() if p.name.startswith(".") or ".part" in p.name]


# --- real MNIST through the command ---------------------------------------------------------------


def test_pack_source_download_real_mnist(mirror, mnist_dir, tmp_path):
    url = mirror.serve("mnist", {name: (mnist_dir / name).read_bytes() for name in MNIST_MD5})
    download_dir, out = tmp_path / "dl", tmp_path / "shards"
    result = run_cli(
        "pack", "--source", "download", "--mirror", url, "--download-dir", download_dir, "--out", out,
        timeout=180, env=NO_PROXY,
    )
    assert result.returncode == 0, result.stderr
    assert "train: 60,000 images" in result.stdout and "test: 10,000 images" in result.stdout
    assert sorted(mirror.requests) == sorted(f"/mnist/{name}" for name in MNIST_MD5)
    for name, md5 in MNIST_MD5.items():  # the published MD5s: byte-identical copies
        assert hashlib.md5((download_dir / name).read_bytes()).hexdigest() == md5
    assert no_partial_files(download_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "mnist"
    assert (manifest["splits"]["train"]["samples"], manifest["splits"]["test"]["samples"]) == (60000, 10000)
    assert set(manifest["source"]["files"]) == set(MNIST_MD5)


# --- download_mnist ------------------------------------------------------------------------------------


def test_download_generated_files_with_own_md5_table(mirror, generated, tmp_path):
    files, table = generated
    url = mirror.serve("m", files)
    dest = download_mnist(tmp_path / "dl", mirrors=[url], files=table, timeout_s=10)
    assert dest == tmp_path / "dl"
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files
    assert sorted(mirror.requests) == sorted(f"/m/{name}" for name in files)
    dataset = load_source(dest)
    assert (len(dataset.splits["train"].labels), len(dataset.splits["test"].labels)) == (90, 30)


def test_first_mirror_404_falls_back_to_second(mirror, generated, tmp_path):
    files, table = generated
    mirror.serve("good", files)  # nothing is served under /dead/
    dest = download_mnist(tmp_path / "dl", mirrors=[mirror.url("dead"), mirror.url("good")], files=table, timeout_s=10)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files
    expected = [path for name in files for path in (f"/dead/{name}", f"/good/{name}")]
    assert mirror.requests == expected  # in order: the dead mirror first, every time


def test_dropped_connection_falls_back_to_second_mirror(mirror, generated, tmp_path):
    files, table = generated
    mirror.serve("flaky", files)
    mirror.serve("good", files)
    mirror.server.short.add("/flaky/train-images-idx3-ubyte.gz")
    dest = download_mnist(tmp_path / "dl", mirrors=[mirror.url("flaky"), mirror.url("good")], files=table, timeout_s=10)
    assert (dest / "train-images-idx3-ubyte.gz").read_bytes() == files["train-images-idx3-ubyte.gz"]
    assert "/good/train-images-idx3-ubyte.gz" in mirror.requests
    assert no_partial_files(dest)


@pytest.mark.parametrize(
    "digests,wrong,problem",
    [((False, True), "md5", "MD5"), ((True, True), "sha256", "SHA-256"), ((True, True), "md5", "MD5"), ((True, False), "sha256", "SHA-256")],
    ids=["md5-only-published", "sha256-wrong", "md5-wrong", "sha256-only-published"],
)
def test_wrong_digest_on_every_mirror(mirror, generated, tmp_path, digests, wrong, problem):
    """Every published digest is checked: SHA-256 where published, MD5 where that is all there is."""
    files, table = generated
    bad_name = "train-labels-idx1-ubyte.gz"
    expected = published(files[bad_name], *digests)
    table = {**table, bad_name: Published(expected.bytes, **{"sha256": expected.sha256, "md5": expected.md5, wrong: "0" * {"md5": 32, "sha256": 64}[wrong]})}
    mirror.serve("a", files)
    mirror.serve("b", files)
    dest = tmp_path / "dl"
    with pytest.raises(HarnessError) as caught:
        download_mnist(dest, mirrors=[mirror.url("a"), mirror.url("b")], files=table, timeout_s=10)
    message = str(caught.value)
    assert bad_name in message and "failed on every mirror" in message
    assert f"{problem} " in message and f"does not match the published {'0' * (64 if wrong == 'sha256' else 32)}" in message
    assert mirror.url("a") + bad_name in message and mirror.url("b") + bad_name in message
    assert not (dest / bad_name).exists()
    assert no_partial_files(dest)
    assert (dest / "train-images-idx3-ubyte.gz").read_bytes() == files["train-images-idx3-ubyte.gz"]  # the good one before it stays


def test_real_mnist_with_one_byte_changed_fails_the_published_sha256(mirror, mnist_dir, tmp_path):
    """The published table itself: a same-size file with one byte changed is refused by its SHA-256."""
    name = "t10k-labels-idx1-ubyte.gz"
    body = bytearray((mnist_dir / name).read_bytes())
    body[-20] ^= 0x01
    url = mirror.serve("m", {name: bytes(body)})
    with pytest.raises(HarnessError, match=f"SHA-256 [0-9a-f]{{64}} does not match the published {MNIST_SHA256[name]}"):
        download_mnist(tmp_path / "dl", mirrors=[url], files={name: MNIST_FILES[name]}, timeout_s=10)
    assert not (tmp_path / "dl" / name).exists() and no_partial_files(tmp_path / "dl")


def test_cli_download_of_files_that_are_not_mnist_exits_2(mirror, generated, tmp_path, capsys):
    """Through `harness pack`: files that are not the published MNIST are refused, here by
    their size, from the Content-Length, before their body is read."""
    files, _ = generated
    url = mirror.serve("fake", files)
    rc = cli_main(["pack", "--source", "download", "--mirror", url, "--download-dir", str(tmp_path / "dl"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: download of train-images-idx3-ubyte.gz failed on every mirror")
    assert f"Content-Length {len(files['train-images-idx3-ubyte.gz'])}; the published size is 9912422" in lines[0]
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "dl" / "train-images-idx3-ubyte.gz").exists() and no_partial_files(tmp_path / "dl")


def test_a_mirror_that_sends_too_much_is_cut_off(mirror, generated, tmp_path):
    """A body without a Content-Length that never ends: reading stops just past the
    published size (the old code wrote all of it to disk before checking)."""
    files, table = generated
    name = "t10k-labels-idx1-ubyte.gz"
    url = mirror.serve("endless", files)
    mirror.server.endless.add(f"/endless/{name}")
    started = time.monotonic()
    with pytest.raises(HarnessError, match=f"more than the published {table[name].bytes} bytes; stopped reading"):
        download_mnist(tmp_path / "dl", mirrors=[url], files={name: table[name]}, timeout_s=10)
    assert time.monotonic() - started < 10  # cut off just past the published bytes (a loopback read); the body never ends
    assert no_partial_files(tmp_path / "dl") and not (tmp_path / "dl" / name).exists()


def test_a_mirror_that_trickles_is_given_up_at_the_deadline(mirror, generated, tmp_path):
    files, table = generated
    name = "t10k-labels-idx1-ubyte.gz"
    url = mirror.serve("slow", files)
    mirror.server.slow.add(f"/slow/{name}")
    started = time.monotonic()
    with pytest.raises(HarnessError, match="took longer than 1 s; stopped reading"):
        download_mnist(tmp_path / "dl", mirrors=[url], files={name: table[name]}, timeout_s=10, deadline_s=1)
    assert time.monotonic() - started < 5  # the 1 s deadline and the read it ends in; without it, the trickle's whole length
    assert no_partial_files(tmp_path / "dl")


def test_https_mirrors_come_first():
    schemes = [m.split(":", 1)[0] for m in MIRRORS]
    assert schemes == sorted(schemes, key=lambda s: s != "https") and schemes[0] == "https"


def test_all_mirrors_unreachable(mirror, generated, tmp_path):
    _, table = generated
    with pytest.raises(HarnessError) as caught:
        download_mnist(tmp_path / "dl", mirrors=[mirror.url("x"), mirror.url("y")], files=table, timeout_s=10)
    assert "train-images-idx3-ubyte.gz" in str(caught.value) and "404" in str(caught.value)
    assert no_partial_files(tmp_path / "dl")


def test_present_correct_file_is_not_downloaded_again(mirror, generated, tmp_path):
    files, table = generated
    url = mirror.serve("m", files)
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "t10k-images-idx3-ubyte.gz").write_bytes(files["t10k-images-idx3-ubyte.gz"])
    (dest / "train-labels-idx1-ubyte.gz").write_bytes(b"a stale, wrong file")  # wrong MD5: fetched again
    download_mnist(dest, mirrors=[url], files=table, timeout_s=10)
    assert sorted(mirror.requests) == sorted(f"/m/{n}" for n in files if n != "t10k-images-idx3-ubyte.gz")
    # ... and kept, moved aside: it may be a user's own file of that name (Fashion-MNIST's, say)
    (aside,) = dest.glob("train-labels-idx1-ubyte.gz.set-aside-*")
    assert aside.read_bytes() == b"a stale, wrong file"
    aside.unlink()
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files
    # A second run finds everything in place and asks the server for nothing.
    count = len(mirror.requests)
    download_mnist(dest, mirrors=[url], files=table, timeout_s=10)
    assert len(mirror.requests) == count


def test_pack_into_existing_shards_refuses_before_downloading(mirror, generated, tmp_path, capsys):
    files, _ = generated
    url = mirror.serve("m", files)
    out = tmp_path / "shards"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    rc = cli_main(["pack", "--source", "download", "--mirror", url, "--download-dir", str(tmp_path / "dl"), "--out", str(out)])
    assert rc == 2 and "already holds shards" in capsys.readouterr().err
    assert mirror.requests == []
    assert (out / "manifest.json").read_text() == "{}"


# --- partial files, and the options checked before a download ---------------------------------------


def part_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".part-" in p.name)


def start_slow_pack(mirror, mnist_dir: Path, download_dir: Path, out: Path) -> subprocess.Popen:
    """`harness pack --source download` from a mirror that trickles the first file (a byte
    every 50 ms), once its part file is there. SIGINT as from a terminal (see test_pack)."""
    url = mirror.serve("slow", {name: (mnist_dir / name).read_bytes() for name in MNIST_MD5})
    mirror.server.slow.add("/slow/train-images-idx3-ubyte.gz")
    command = [sys.executable, "-m", "harness", "pack", "--source", "download", "--mirror", url, "--download-dir", str(download_dir), "--out", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **NO_PROXY},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: (download_dir.is_dir() and part_files(download_dir)) or process.poll() is not None, 120, "the part file")
        assert process.poll() is None, process.communicate()
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


@pytest.mark.parametrize("sig,status,line", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_download_leaves_no_part_file(mirror, mnist_dir, tmp_path, sig, status, line):
    """Ctrl-C or a SIGTERM mid-download ends the pack with one line and 128 + the signal,
    and removes its part file (it was removed only for a failed download, and piled up)."""
    download_dir = tmp_path / "dl"
    process = start_slow_pack(mirror, mnist_dir, download_dir, tmp_path / "out")
    try:
        process.send_signal(sig)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert (process.returncode, err.strip().splitlines()[-1:]) == (status, [line]), err[-3000:]
    assert part_files(download_dir) == [] and not (tmp_path / "out").exists()


def test_part_files_of_dead_processes_are_removed_a_live_ones_kept(mirror, mnist_dir, tmp_path, capsys):
    """A SIGKILLed download leaves its part file (nothing runs to remove it): the next
    download into the directory removes it, and says so. One of a process that still runs
    (another pack downloading into the same directory) is left alone."""
    download_dir = tmp_path / "dl"
    process = start_slow_pack(mirror, mnist_dir, download_dir, tmp_path / "out")
    process.kill()
    process.communicate(timeout=60)
    killed = f".train-images-idx3-ubyte.gz.part-{process.pid}"
    assert part_files(download_dir) == [killed]
    live = download_dir / f".t10k-images-idx3-ubyte.gz.part-{os.getppid()}"  # pytest's parent runs
    live.write_bytes(b"being downloaded")
    not_ours = download_dir / ".notes.txt.part-1"  # not a file the download writes
    not_ours.write_bytes(b"keep")
    url = mirror.serve("fast", {name: (mnist_dir / name).read_bytes() for name in MNIST_MD5})
    download_mnist(download_dir, mirrors=[url], timeout_s=10)
    assert capsys.readouterr().out == f"removed 1 partial download(s) of processes that no longer run: {killed}\n"
    assert part_files(download_dir) == sorted([live.name, not_ours.name])
    assert sorted(p.name for p in download_dir.iterdir() if not p.name.startswith(".")) == sorted(MNIST_MD5)


def test_download_dir_that_is_a_file_is_refused_before_downloading(mirror, generated, tmp_path, capsys):
    """It was the OS's `File exists` (status 1); now one error naming the option, status 2."""
    files, _ = generated
    url = mirror.serve("m", files)
    (tmp_path / "some-file").write_text("not a directory\n")
    for download_dir, problem in ((tmp_path / "some-file", "not a directory"), (tmp_path / "some-file" / "dl", f"{tmp_path / 'some-file'} is not a directory")):
        rc, _, err = cli(capsys, "pack", "--source", "download", "--mirror", url, "--download-dir", download_dir, "--out", tmp_path / "out")
        assert_one_error(rc, err, f"--download-dir {download_dir}: {problem}")
    assert mirror.requests == [] and sorted(p.name for p in tmp_path.iterdir()) == ["some-file"]


@pytest.mark.parametrize("url", ["127.0.0.1:18081", "localhost:8080/mnist/", "ftp://127.0.0.1/mnist/", "http:///mnist/", "http://[::1/mnist/"])
def test_mirror_that_is_not_a_url_is_refused_before_the_download_dir_is_made(tmp_path, capsys, url):
    """It was urllib's `unknown url type: 127.0.0.1` on every file, after --download-dir was made."""
    rc, _, err = cli(capsys, "pack", "--source", "download", "--mirror", url, "--download-dir", tmp_path / "dl", "--out", tmp_path / "out")
    assert_one_error(rc, err, f"--mirror {url}: not an http://, https:// or file:// URL")
    assert sorted(tmp_path.iterdir()) == []


def test_a_file_url_mirror_is_read(generated, tmp_path):
    """file:// mirrors (a local copy of one) are read as http ones are, and checked alike."""
    files, table = generated
    (tmp_path / "copy").mkdir()
    for name, body in files.items():
        (tmp_path / "copy" / name).write_bytes(body)
    dest = download_mnist(tmp_path / "dl", mirrors=[(tmp_path / "copy").as_uri() + "/"], files=table, timeout_s=10)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files

"""Download MNIST from the standard public mirrors, verifying each file's MD5."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from harness.errors import HarnessError

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


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_mnist(
    dest: Path,
    mirrors: tuple[str, ...] | list[str] = MIRRORS,
    checksums: dict[str, str] = MNIST_MD5,
    timeout_s: float = 60.0,
) -> Path:
    """Fetch every file in `checksums` into `dest`, trying the mirrors in order.

    A file already in `dest` with the right MD5 is kept. Downloads go to a
    temporary name and are renamed only once their MD5 matches, so `dest`
    never holds a partial or wrong file under the real name.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, md5 in checksums.items():
        target = dest / name
        if target.is_file() and md5_of(target) == md5:
            continue
        problems = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            tmp = dest / f".{name}.part-{os.getpid()}"
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as out:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                problems.append(f"{url}: {e}")
                tmp.unlink(missing_ok=True)
                continue
            got = md5_of(tmp)
            if got != md5:
                problems.append(f"{url}: MD5 {got} does not match the published {md5}")
                tmp.unlink()
                continue
            os.replace(tmp, target)
            break
        else:
            raise HarnessError(f"download of {name} failed on every mirror: " + "; ".join(problems))
    return dest

#!/usr/bin/env python
"""What each rank reads: bytes and images/s per rank at W = 1, 2 and 4, from local disk
and over HTTP, and start-up time as the split grows.

    MNIST_DIR=../shared/mnist python bench/bench_read.py [--sizes 60000,600000]

For each size, a source is made with make_large_mnist.py (MNIST shifted, real digits) and
packed with `harness pack` (shards of 10,000, blocks of 1,000). Then:

- per_rank: W processes start together, each one rank of W, and read one epoch of the
  training split through MacroBatchStream (macro-batches of --macro-batch, global batch
  --batch, CPU, no training): the shard bytes it read (indexes plus its own images), the
  bytes it fetched over HTTP (the W ranks share one cache, as the ranks of a node do; the
  cache starts empty) and its images/s, over the first epoch; then, in a second epoch,
  the 4 KiB file pages its image reads touch (a filesystem reads whole pages, so this is
  what a rank costs a shared filesystem). `local` reads the shard directory (the page
  cache is warm: the shards were just written); `http` goes through a
  `python -m http.server` on loopback.
- startup: one process, W = 1: reading and checking the manifest, hashing every training
  shard (what each of W ranks does for 1/W of them), and the first macro-batch.

Prints one JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import hardware, make_log, mnist_dir, positive_int, positive_ints, versions

HERE = Path(__file__).resolve().parent
log = make_log("bench_read")

# One rank: argv = location, cache, rank, world, batch, macro_batch, start time (epoch seconds).
RANK = r"""
import json, sys, time
import torch
from harness.data.shard_set import ShardSource, ShardSplit
from harness.data.stream import MacroBatchStream
location, cache, rank, world, batch, macro, start = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7]), float(sys.argv[7])
torch.set_num_threads(1)
time.sleep(max(0.0, start - time.time()))  # the ranks begin together
t0 = time.perf_counter()
source = ShardSource(location, cache)
split = ShardSplit(source, "train", verify=False)
stream = MacroBatchStream(split, batch, macro, seed=0, device=torch.device("cpu"), rank=rank, world_size=world)
images = sum(len(m.order) for m in stream.epoch(0))
seconds, read = time.perf_counter() - t0, split.bytes_read
split.pages = set()  # a second epoch, untimed, for the file pages its image reads touch
sum(len(m.order) for m in stream.epoch(1))
print(json.dumps({"rank": rank, "images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds),
                  "shard_bytes_read": read, "http_bytes_fetched": source.remote.bytes_fetched if source.remote else 0,
                  "image_pages_touched_per_epoch": len(split.pages)}))
"""

STARTUP = r"""
import json, sys, time
import torch
from harness.data.shard_set import ShardSource, ShardSplit
from harness.data.stream import MacroBatchStream
t0 = time.perf_counter()
source = ShardSource(sys.argv[1])
t1 = time.perf_counter()
source.check("train")
t2 = time.perf_counter()
split = ShardSplit(source, "train", verify=False)
next(MacroBatchStream(split, 100, int(sys.argv[2]), seed=0, device=torch.device("cpu")).epoch(0))
t3 = time.perf_counter()
print(json.dumps({"manifest_s": round(t1 - t0, 4), "hash_all_train_shards_s": round(t2 - t1, 3), "first_macro_batch_s": round(t3 - t2, 3)}))
"""


def run_ranks(location: str, cache: Path, world: int, batch: int, macro: int) -> list[dict]:
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", RANK, location, str(cache), str(r), str(world), str(batch), str(macro), str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_PROXY": "127.0.0.1"})
             for r in range(world)]
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode:
            raise SystemExit(f"rank failed: {err[-2000:]}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def serve(directory: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(directory), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}/"
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("the HTTP server did not start")


def measure_size(size: int, tmp: Path, args) -> dict:
    source, shards = tmp / f"source-{size}", tmp / f"shards-{size}"
    log(f"{size:,} images: make and pack")
    subprocess.run([sys.executable, str(HERE / "make_large_mnist.py"), str(source), "--images", str(size)], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "harness", "pack", "--source", str(source), "--out", str(shards)], check=True, capture_output=True)
    subprocess.run(["rm", "-rf", str(source)], check=True)
    split_bytes = sum(s["bytes"] for s in json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"])
    result = {"train_images": size, "train_shard_bytes": split_bytes}
    startup = subprocess.run([sys.executable, "-c", STARTUP, str(shards), str(args.macro_batch)], check=True, capture_output=True, text=True)
    result["startup"] = json.loads(startup.stdout.strip().splitlines()[-1])
    server, url = serve(shards)
    try:
        for where, location in (("local", str(shards)), ("http", url)):
            for world in args.world_sizes:
                log(f"{size:,} images: {where}, W={world}")
                cache = tmp / f"cache-{size}-{where}-{world}"
                ranks = run_ranks(location, cache, world, args.batch, args.macro_batch)
                subprocess.run(["rm", "-rf", str(cache)], check=True)
                result.setdefault("per_rank", {}).setdefault(where, {})[str(world)] = {
                    "ranks": ranks,
                    "shard_bytes_read_per_rank_over_split": round(max(r["shard_bytes_read"] for r in ranks) / split_bytes, 4),
                    "pages_touched_per_rank_over_split": round(max(r["image_pages_touched_per_epoch"] for r in ranks) * 4096 / split_bytes, 4),
                    "http_bytes_fetched_over_split": round(sum(r["http_bytes_fetched"] for r in ranks) / split_bytes, 4),
                    "images_per_s_per_rank": min(r["images_per_s"] for r in ranks),
                }
    finally:
        server.terminate()
        server.wait(timeout=10)
    subprocess.run(["rm", "-rf", str(shards)], check=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=positive_ints, default="60000,600000", help="training images, comma-separated")
    parser.add_argument("--world-sizes", type=positive_ints, default="1,2,4")
    parser.add_argument("--batch", type=positive_int, default=100, help="global batch")
    parser.add_argument("--macro-batch", type=positive_int, default=20000, help="images per macro-batch (smaller than the split: streamed)")
    args = parser.parse_args()
    mnist_dir()  # exits with a message when MNIST_DIR is not set
    record = {"benchmark": "bench_read", "hardware": hardware(), "versions": versions(),
              "settings": {"batch": args.batch, "macro_batch": args.macro_batch, "shard_size": 10000, "block_size": 1000}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp:
        for size in args.sizes:
            record["runs"].append(measure_size(size, Path(tmp), args))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

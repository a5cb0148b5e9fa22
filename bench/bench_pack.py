#!/usr/bin/env python
"""Benchmark: `harness pack` in bounded memory, as the source grows.

For each size (default MNIST's 60,000 training images, 600,000 and 2,940,000), a source is made with
bench/make_large_mnist.py and packed twice, each time in a fresh process: streamed (what
`harness pack` does: IDX blocks go from the source files to the shards, one block in
memory) and whole (the split read into memory first, as `harness pack` did before). Each
reports its peak resident memory (the process's ru_maxrss), its time, and whether the two
packs are byte-identical. Past read_idx's in-memory limit (1 GiB, 1.37 M images) only the
streamed pack runs. One JSON record on stdout.

    MNIST_DIR=../shared/mnist python bench/bench_pack.py [--sizes 60000,600000,2940000] > pack.json
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import hardware, make_log, mnist_dir, positive_ints, versions

from harness.data.idx import MAX_IDX_BYTES

log = make_log("pack")
HERE = Path(__file__).resolve().parent

CHILD = """
import json, resource, sys, time
from harness.data.pack import pack
from harness.data.sources import load_source
started = time.perf_counter()
pack(load_source(sys.argv[1], stream=sys.argv[3] == "streamed"), sys.argv[2])
print(json.dumps({"seconds": round(time.perf_counter() - started, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def pack_in_child(source: Path, out: Path, how: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(source), str(out), how], capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode:
        return {"failed": done.stderr[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return names == sorted(p.name for p in b.iterdir()) and not mismatch and not errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=positive_ints, default="60000,600000,2940000", help="training images per source, comma-separated")
    args = parser.parse_args()
    mnist_dir()  # exits with a message when MNIST_DIR is not set
    record = {"benchmark": "bench_pack", "hardware": hardware(), "versions": versions(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
        for size in args.sizes:
            source = Path(tmp) / f"source-{size}"
            log(f"making a source of {size:,} training images")
            subprocess.run([sys.executable, str(HERE / "make_large_mnist.py"), str(source), "--images", str(size)],
                           check=True, capture_output=True, env={**os.environ})
            run = {"train_images": size, "train_image_bytes": size * 784}
            for how in ("streamed", "whole"):
                if how == "whole" and size * 784 > MAX_IDX_BYTES:
                    run[how] = {"skipped": f"more than the {MAX_IDX_BYTES} bytes read_idx holds in memory"}
                    continue
                log(f"{size:,}: pack, {how}")
                run[how] = pack_in_child(source, Path(tmp) / f"shards-{size}-{how}", how)
            if "seconds" in run["whole"]:
                run["identical"] = same_files(Path(tmp) / f"shards-{size}-streamed", Path(tmp) / f"shards-{size}-whole")
            record["runs"].append(run)
            for how in ("streamed", "whole"):
                subprocess.run(["rm", "-rf", str(Path(tmp) / f"shards-{size}-{how}")], check=False)
            subprocess.run(["rm", "-rf", str(source)], check=False)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""A model, not a measurement: data-parallel efficiency of LeNet for 2-8 GPUs and 2 nodes.

    python bench/scaling_model.py --step-ms 0.30 [--batch 100] > scaling.json

Inputs: the measured time of one training step on one GPU (`--step-ms`, from
bench/gpu_check.sh) and the gradient that every step all-reduces (838,858 fp32
parameters: 3.36 MB). DDP puts LeNet's whole gradient in one or two buckets, most of it
fc1's 3.3 MB, which is ready early in the backward pass; the model assumes no overlap
with compute at all, so it is a lower bound on efficiency.

A ring all-reduce of S bytes over N ranks moves 2(N-1)/N * S through each link and takes
2(N-1) latency-bound hops: t = 2(N-1)/N * S / B + 2(N-1) * a. Assumed fabric figures,
each derated from the datasheet for a message this small:
- NVLink 4 in an HGX H100 (datasheet: 900 GB/s per GPU, both directions): B = 150 GB/s
  for a 3.4 MB all-reduce (nccl-tests reach about 450 GB/s bus bandwidth only for messages
  of hundreds of MB), a = 3 us per hop.
- Two nodes, one 400 Gb/s NDR InfiniBand NIC per GPU (datasheet: 50 GB/s per direction):
  hierarchical all-reduce (reduce-scatter inside the node over NVLink, an all-reduce of
  S/8 per NIC across the nodes, all-gather inside the node); B = 25 GB/s across nodes for
  a 420 kB share, a = 8 us per inter-node hop.

Two ways to use more GPUs:
- strong scaling, the harness's default: the global batch stays (elastic determinism),
  each GPU gets batch/N. LeNet's step is bound by kernel launches, not arithmetic, so a
  smaller share barely shortens it: the model keeps the step time.
- weak scaling: each GPU keeps the batch (the global batch grows N times, which changes
  the training: the learning rate and schedule must be re-tuned).
"""

from __future__ import annotations

import argparse
import json

from common import positive_float, positive_int

GRADIENT_BYTES = 838_858 * 4
FABRICS = {
    "nvlink": {"bandwidth_gb_s": 150.0, "hop_latency_us": 3.0},
    "infiniband": {"bandwidth_gb_s": 25.0, "hop_latency_us": 8.0},
}


def ring_allreduce_ms(ranks: int, size_bytes: float, fabric: str) -> float:
    f = FABRICS[fabric]
    if ranks < 2:
        return 0.0
    return (2 * (ranks - 1) / ranks * size_bytes / (f["bandwidth_gb_s"] * 1e9) + 2 * (ranks - 1) * f["hop_latency_us"] * 1e-6) * 1e3


def allreduce_ms(gpus_per_node: int, nodes: int) -> float:
    """Inside one node a ring over NVLink; across nodes the hierarchical scheme above."""
    inside = ring_allreduce_ms(gpus_per_node, GRADIENT_BYTES, "nvlink")
    if nodes == 1:
        return inside
    return inside + ring_allreduce_ms(nodes, GRADIENT_BYTES / gpus_per_node, "infiniband")


def table(step_ms: float, batch: int) -> list[dict]:
    rows = []
    for label, gpus, nodes in (("2 GPUs, NVLink", 2, 1), ("4 GPUs, NVLink", 4, 1), ("8 GPUs, NVLink", 8, 1),
                               ("2 nodes x 8 GPUs, InfiniBand", 8, 2)):
        total = gpus * nodes
        comm = allreduce_ms(gpus, nodes)
        step = step_ms + comm
        rows.append({
            "setup": label,
            "allreduce_ms": round(comm, 3),
            # strong: the same global batch per step as one GPU, each step now costs `step`
            "strong_speedup": round(step_ms / step, 2),
            "strong_efficiency": round(step_ms / step / total, 3),
            # weak: total x the images per step
            "weak_speedup": round(total * step_ms / step, 2),
            "weak_efficiency": round(step_ms / step, 3),
            "images_per_s_weak": round(total * batch / (step / 1e3)),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-ms", type=positive_float, required=True, help="measured time of one training step on one GPU, ms")
    parser.add_argument("--batch", type=positive_int, default=100, help="images per GPU per step (default 100, the lenet preset)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead of JSON")
    args = parser.parse_args()
    rows = table(args.step_ms, args.batch)
    if args.markdown:
        print(f"| setup (model; one-GPU step {args.step_ms} ms, batch {args.batch}) | all-reduce | strong speedup | weak speedup | weak efficiency |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['setup']} | {r['allreduce_ms']} ms | {r['strong_speedup']}x | {r['weak_speedup']}x | {100 * r['weak_efficiency']:.0f}% |")
        return
    print(json.dumps({"model": "ring all-reduce, no compute overlap", "fabrics": FABRICS, "gradient_bytes": GRADIENT_BYTES,
                      "step_ms": args.step_ms, "batch": args.batch, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

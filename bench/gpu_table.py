#!/usr/bin/env python
"""The one-screen summary of bench/gpu_check.sh's results: python bench/gpu_table.py OUT_DIR."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def main(out: Path) -> None:
    versions = load(out / "versions.json") or {}
    print(f"GPU {versions.get('gpu')}  torch {versions.get('torch')}  CUDA {versions.get('cuda')}  NCCL {versions.get('nccl')}")
    tests = (out / "gpu-tests.log").read_text(errors="replace") if (out / "gpu-tests.log").exists() else ""
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error|deselected).*?) in [\d.]+s", tests, re.M)  # one line per pytest process
    print(f"GPU tests: {'; '.join(summary) if summary else 'no result (see gpu-tests.log)'}")
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", tests, re.M)
    if failed:
        print("  failed: " + ", ".join(failed))
    shared = [json.loads(line) for line in tests.splitlines() if line.startswith('{"shared_gpu_max_param_diff"')]
    if shared:
        print(f"  two ranks on one GPU vs one rank: max |diff| {shared[-1]['one_step']:.2e} after 1 step, "
              f"{shared[-1]['shared_gpu_max_param_diff']:.2e} after 50 ({shared[-1]['backend']})")
    inductor = {}
    for line in tests.splitlines():
        if line.startswith('{"inductor_one_step_max_param_diff"'):
            inductor.update(json.loads(line)["inductor_one_step_max_param_diff"])
    if inductor:
        print("  inductor's step vs eager, one step: max |diff| " + "  ".join(f"{k} {v:.2e}" for k, v in inductor.items()))
    probe = load(out / "probe.json")
    if probe:
        steps = probe["graphed_step_ms"]
        print("graphed step ms (probe; det|nondet/precision/layout/batch): "
              + "  ".join(f"{k}={v}" for k, v in steps.items() if not isinstance(v, str)))
        firsts = probe.get("first_step_ms", {})
        if firsts:
            print("  first step after capture, ms: " + "  ".join(f"{k}={v}" for k, v in list(firsts.items())[:4]) + "  ...")
        for mode, kernels in probe.get("eager_top_kernels", {}).items():
            print(f"  {mode} eager top kernels (us/step): " + "; ".join(f"{k['kernel'][:40]} {k['us_per_step']}" for k in kernels[:4]))
        if "optimizer_update_us" in probe:
            print("  SGD update alone, device us: " + "  ".join(f"{k}={v}" for k, v in probe["optimizer_update_us"].items()))
        for name, r in probe.get("update_in_graph_ms", {}).items():
            if isinstance(r, str):
                print(f"  update in the graph, {name}: {r[:100]}")
            else:
                print(f"  update after / inside the graph, {name}: ms {r['after']} / {r['inside']}; "
                      f"host launch us {r['launch_us_after']} / {r['launch_us_inside']}")
    disk = load(out / "disk.json") or {}
    print(f"disk: 6.7 MB written and fsynced in {disk.get('median_ms')} ms (median of 5, {disk.get('dir')})")
    writer = (load(out / "writer_gil.json") or {}).get("figures", {})
    if writer:
        print("writer thread keeps the training thread from the GIL, longest stretch ms (first call; later median/max): "
              + "  ".join(f"{job} {v['first']['longest_ms']}; {v['later_longest_ms_median']}/{v['later_longest_ms_max']}" for job, v in writer.items()))
    bench = load(out / "bench_gpu.json")
    if not bench:
        print("benchmarks: no record (see bench_gpu.log)")
        return
    f = bench["figures"]
    print(f"{'variant (lenet, 2 epochs)':36} {'img/s':>10} {'test acc':>9}")
    for name, v in f.get("variants", {}).items():
        print(f"  {name:34} {v.get('samples_per_s', 'failed'):>10} {v.get('test_accuracy', float('nan')):>9.4f}")
    lenet = f.get("lenet", {})
    print(f"lenet 15 epochs ({lenet.get('variant')}): acc {lenet.get('test_accuracy')}  loop {lenet.get('loop_seconds')} s  "
          f"wall {lenet.get('wall_seconds')} s   [targets: >= 0.992, <= 2 s]")
    print(f"  step {lenet.get('step_ms')} ms at batch 100, {lenet.get('achieved_tflops')} TFLOP/s")
    print(f"  loop by part (s): {lenet.get('loop_seconds_by_part')}")
    for key in ("fast", "fast_inductor", "fast_cuda_graph"):  # fast_inductor: records before fast took --compile gpu
        if key not in f or (key != "fast" and not f[key]["runs"]):
            continue
        fast = f[key]
        print(f"{key} preset: mean acc {fast.get('mean_test_accuracy')}  median s to 99% {fast.get('median_seconds_to_99')} "
              f"({fast.get('runs_reaching_99')} runs reached 99%)  "
              f"[targets: >= 0.990, <= 0.15 s]")
        for r in fast.get("runs", []):
            print(f"  seed {r.get('seed')}: {r.get('test_accuracy')} after {r.get('epochs')} epochs, to 99%: {r.get('seconds_to_99')} s, "
                  f"epochs {r.get('epoch_seconds')} s, compile {r.get('compile_seconds')} s" + (" FAILED" if "failed" in r else "")
                  + (" (the FALLBACK: the run as asked failed)" if "compiled_run_failed" in r else ""))
            print(f"    loop {r.get('loop_seconds')} s by part: {r.get('loop_seconds_by_part')}")
    fast = f.get("fast", {})
    for name, extra in fast.get("first_epoch_extra", {}).items():
        print(f"  first epoch minus second ({name}): {extra.get('seconds')} s, epochs {extra.get('epoch_seconds')} s"
              + (" FAILED" if "failed" in extra else ""))
        if "first_minus_second_by_window" in extra:
            print(f"    by 13-step window, s: {extra['first_minus_second_by_window']}")
    bare = f.get("harness_vs_bare", {})
    print(f"harness / bare loop ({bare.get('variant')}): {bare.get('median_ratio')}   [target >= 1.0]")
    for r in bare.get("rounds", []):
        print(f"  img/s: harness {r['harness']}  bare {r['bare']}  ratio {r['ratio']}"
              + (f"  bare with the harness's loss window and syncs {r['bare_like_harness']}" if "bare_like_harness" in r else ""))
        if "harness_ms_per_step_by_window" in r:
            print(f"    ms/step: bare {r['bare_ms_per_step']}, harness by sync window {r['harness_ms_per_step_by_window']}")
    loader = f.get("harness_vs_dataloader", {})
    print(f"harness / DataLoader loop: {loader.get('ratio')}x ({loader.get('harness_samples_per_s')} vs "
          f"{loader.get('dataloader_samples_per_s')} img/s)   [target >= 10]")
    if bench.get("skipped"):
        print(f"skipped for time: {', '.join(bench['skipped'])}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, metavar="OUT_DIR", help="the directory bench/gpu_check.sh wrote its records to")
    main(parser.parse_args().out)

"""The fuzz suite at scale: tests/fuzzing.py's seeded mutations of IDX files, CSV files,
manifests, shards and checkpoint markers, by the thousand (CI runs 200 of each kind).

    python bench/fuzz_inputs.py [--cases 5000] [--kinds idx,csv,manifest,shards,markers] [--first-seed 0] > fuzz.json

Prints one JSON record: per kind, how many mutated inputs were tried, accepted (read back
equal to an independent decoding of the mutated bytes), refused with one error line
naming a file of the input, and anything else (failures: a traceback or other exception,
a hang, a payload that ran, a changed input file, an accepted input that is not valid,
a valid one refused), with the first few failures' seeds to rerun. Exits 1 if there is
any failure. Needs no MNIST: the seed inputs are small generated ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fuzz engine lives with the tests that run it in CI

log = common.make_log("fuzz")


def fuzz_kind(kind: str, seeds, work: Path, first_seed: int, cases: int, budget_s: float) -> dict:
    from fuzzing import run_cases

    started = time.perf_counter()
    tally = run_cases(kind, range(first_seed, first_seed + cases), seeds, work, budget_s=budget_s)
    seconds = time.perf_counter() - started
    tried = sum(tally.counts.values())
    refused_by_name = tally.counts.get("refused_by_name", 0)
    log(f"{kind}: {tried} tried, {tally.counts.get('accepted', 0)} accepted, {refused_by_name} refused by name, "
        f"{len(tally.failures)} failures, {seconds:.0f} s")
    return {
        "tried": tried,
        "accepted": tally.counts.get("accepted", 0),
        "refused_by_name": refused_by_name,
        "refused_other": tally.counts.get("refused_other", 0),
        "failures": tally.counts.get("failure", 0),
        "seconds": round(seconds, 1),
        "cases_per_s": round(tried / seconds, 1) if seconds else None,
        "first_failures": [{"seed": o.seed, "verdict": o.verdict, "detail": o.detail} for o in tally.failures[:10]],
    }


def main() -> int:
    from fuzzing import KINDS, Seeds

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=5000, help="mutated inputs per kind (default 5000)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+cases-1 (CI uses 0..199)")
    parser.add_argument("--budget-s", type=float, default=1800.0, help="stop each kind after this many seconds (default 1800)")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        sys.exit(f"error: unknown kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    with tempfile.TemporaryDirectory(prefix="fuzz-") as work:
        seeds = Seeds(Path(work))
        figures = {kind: fuzz_kind(kind, seeds, Path(work), args.first_seed, args.cases, args.budget_s) for kind in kinds}
    totals = {key: sum(f[key] for f in figures.values()) for key in ("tried", "accepted", "refused_by_name", "refused_other", "failures")}
    record = {
        "benchmark": "fuzz_inputs",
        "hardware": common.hardware(),
        "versions": common.versions("jsonschema"),
        "harness_code": common.git_state(ROOT / "harness"),
        "settings": {"cases_per_kind": args.cases, "first_seed": args.first_seed, "kinds": kinds, "budget_s_per_kind": args.budget_s},
        "figures": {"per_kind": figures, "total": totals},
    }
    print(json.dumps(record, indent=1))
    return 1 if totals["failures"] or totals["refused_other"] else 0


if __name__ == "__main__":
    sys.exit(main())

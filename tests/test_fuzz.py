"""The fuzz suite, CI-sized: seeded mutations of IDX files, CSV files, manifests, shards and
checkpoint markers (tests/fuzzing.py says what is mutated and what is checked). Each
kind runs CASES_PER_KIND cases in a few seconds; `bench/fuzz_inputs.py` runs the same
cases by the thousand."""

from __future__ import annotations

import json

import pytest
from fuzzing import KINDS, Seeds, run_cases
from helpers import summary, train_ok

CASES_PER_KIND = 200


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Seeds:
    return Seeds(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("kind", KINDS)
def test_mutated_inputs_are_accepted_intact_or_refused_by_name(seeds, tmp_path, kind):
    tally = run_cases(kind, range(CASES_PER_KIND), seeds, tmp_path)
    assert not tally.failures, "\n".join(f"seed {o.seed}: {o.verdict}: {o.detail}" for o in tally.failures[:10])
    assert sum(tally.counts.values()) == CASES_PER_KIND
    # Most mutations break the input; a fuzzer that only ever produced valid inputs would test nothing.
    assert tally.counts.get("refused_by_name", 0) > CASES_PER_KIND // 2, tally.counts


def test_the_unmutated_inputs_train_and_resume(seeds, tmp_path):
    """The other half of the invariant: the valid seed input trains, through the real command."""
    run_dir = tmp_path / "run"
    args = ("--preset", "lenet", "--device", "cpu", "--batch-size", "20", "--threads", "1", "--checkpoint-every", "1")
    train_ok(seeds.shards, run_dir, *args, "--max-steps", "2")
    result = train_ok(seeds.shards, run_dir, *args, "--max-steps", "3")
    assert "resuming from" in result.stdout and "step 2)" in result.stdout
    assert summary(run_dir)["steps"] == 3
    manifest = json.loads((seeds.shards / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 60

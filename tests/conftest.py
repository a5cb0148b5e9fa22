"""Shared fixtures: real MNIST (through MNIST_DIR), its packed shards, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.data.pack import pack
from harness.data.sources import load_source


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    value = os.environ.get("MNIST_DIR")
    if not value:
        pytest.fail("MNIST_DIR is not set: point it at a directory with the four MNIST IDX files (CI uses ../shared/mnist)")
    path = Path(value)
    assert path.is_dir(), f"MNIST_DIR={value} is not a directory"
    return path


@pytest.fixture(scope="session")
def mnist_shards(mnist_dir, tmp_path_factory) -> Path:
    """Real MNIST packed once per test session with the default layout (read-only for tests)."""
    out = tmp_path_factory.mktemp("mnist") / "shards"
    pack(load_source(mnist_dir), out)
    return out


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m harness ARGS` as a user would; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "harness", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )

"""Shared fixtures: real MNIST and its packed shards, and a small synthetic shard set."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from helpers import checkpointed_run, checksum, mnist_cache_dir, mnist_source, run, write_source

from harness.data.pack import pack
from harness.data.sources import Split, load_source
from harness.errors import HarnessError


@pytest.fixture(autouse=True)
def no_harness_state_left_behind():
    """A test that runs the harness in this process (harness.train's main, a Trainer)
    changes process-wide state that later tests would inherit:
    - setup_logging adds a handler on the stream pytest captured for that test; left on
      the root logger, it made a later test's warnings "--- Logging error ---" tracebacks
      on a closed file (handlers pytest adds and removes itself are left to it);
    - StopRequest installs its handlers, which would swallow a SIGTERM or a first Ctrl-C
      meant for pytest;
    - set_deterministic and --threads set torch's deterministic mode, cuDNN flags and
      thread count, so later in-process tests would run differently by test order."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    backends = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    for handler in list(root.handlers):
        if handler not in before and type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    root.setLevel(level)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = backends
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


@pytest.fixture(scope="session", autouse=True)
def subprocess_tmpdir(tmp_path_factory):
    """The processes the tests start keep their temporary files under pytest's basetemp,
    which pytest prunes, not in /tmp: torchrun's agent leaves a torchelastic_* directory
    behind per run (about 40 a suite run). So does inductor's cache, for this process too
    (it took /tmp before TMPDIR was set): a kernel cached by another run of another torch
    build or kernel set must not be loaded here, as one was once, and crashed pytest with
    a segmentation fault."""
    tmp = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp))
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp / "torchinductor"))
        yield


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The MNIST IDX files: $MNIST_DIR when set, else downloaded once (MD5-checked) into a cache."""
    try:
        return mnist_source(os.environ, mnist_cache_dir(os.environ))
    except HarnessError as e:
        pytest.fail(f"no MNIST for the tests: {e}")


@pytest.fixture(scope="session")
def mnist_shards(mnist_dir, tmp_path_factory) -> Path:
    """Real MNIST packed once per test session with the default layout (read-only for tests)."""
    out = tmp_path_factory.mktemp("mnist") / "shards"
    pack(load_source(mnist_dir), out)
    return out


QUICK_TEST_IMAGES = 2000  # one validation batch (--eval-batch's default)


@pytest.fixture(scope="session")
def quick_shards(mnist_dir, tmp_path_factory) -> Path:
    """Real MNIST's 60,000 training images with its first 2,000 test images, for tests of
    what a run does (stops, resumes, failures, checkpoints), not of how well it learns. A
    LeNet validation on one CPU thread takes 1.4 s over the 10,000 (on a 2-core Xeon), and a
    run validates before training and after each epoch; training is the same on both sets."""
    out = tmp_path_factory.mktemp("mnist-quick") / "shards"
    dataset = load_source(mnist_dir)
    test = dataset.splits["test"]
    dataset.splits["test"] = Split(test.images[:QUICK_TEST_IMAGES], test.labels[:QUICK_TEST_IMAGES])
    dataset.files = {name: info for name, info in dataset.files.items() if name.startswith("train")}  # the test files were cut
    pack(dataset, out)
    return out


@pytest.fixture
def shards(tmp_path) -> Path:
    """A small packed shard set of helpers.write_source's images: train 200 in shards of
    80/80/40 and blocks of 20, test 50 (a fresh copy per test, which may damage it)."""
    out = tmp_path / "shards"
    pack(load_source(write_source(tmp_path / "src")), out, shard_size=80, block_size=20)
    return out


@pytest.fixture(scope="session")
def reference(quick_shards, tmp_path_factory) -> dict[int, str]:
    """The parameter checksums of uninterrupted CHECKPOINTED_RUNs with 1 and 2 processes,
    which a stopped, killed or resumed run must reproduce: {nproc: checksum}. Made once per
    test session (39 s in a suite run on a 2-core Xeon, 61 s with 4 workers there, both
    measured when they validated on all 10,000 test images): under
    pytest-xdist the first worker that needs them makes them, under a lock, and the others
    wait for its file."""

    def make() -> dict[int, str]:
        base = tmp_path_factory.mktemp("reference")
        for nproc in (1, 2):
            result = run(checkpointed_run(quick_shards, base / f"w{nproc}", nproc=nproc))
            assert result.returncode == 0, result.stderr[-3000:]
        return {nproc: checksum(base / f"w{nproc}") for nproc in (1, 2)}

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return make()
    shared = tmp_path_factory.getbasetemp().parent / "reference.json"  # the session's directory, above the workers' own
    with FileLock(f"{shared}.lock", timeout=900):  # 15x the 61 s: a wait must end, but not on a slow machine
        if not shared.exists():
            shared.write_text(json.dumps(make()))
    return {int(nproc): value for nproc, value in json.loads(shared.read_text()).items()}

"""Bad options, launcher variables and launcher arguments: each is one clear error (a
HarnessError, or argparse's, each one line and status 2), not a traceback or a silently ignored value."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import cli, free_port, run

from harness.checkpoint import checkpoint_to_resume
from harness.cli import build_parser as build_cli_parser
from harness.config import build_config
from harness.distributed import init_distributed
from harness.errors import HarnessError
from harness.train import build_parser

ROOT = Path(__file__).resolve().parent.parent


def config_of(*argv):
    args = build_parser().parse_args(list(argv))
    return build_config(args.preset, args)


@pytest.mark.parametrize("argv", [["--run-d", "x"], ["--pres", "lenet"], ["--res", "never"]])
def test_train_options_are_not_abbreviated(argv):
    # slurm/train.sbatch refuses --run-dir/--preset/--shards and drops --resume on a requeue
    # only when spelled out; a prefix must not reach the harness as the option.
    for parse in (build_parser().parse_args, lambda a: build_cli_parser().parse_args(["train", *a])):
        with pytest.raises(SystemExit) as e:
            parse(argv)
        assert e.value.code == 2


@pytest.mark.parametrize("option", [["--activation", "tanh"], ["--hidden", "7"], ["--output-activation", "relu"], ["--leaky-slope", "0.2"]])
def test_mlp_only_options_refused_for_lenet(option):
    with pytest.raises(HarnessError, match=f"{option[0]} is for the mlp model"):
        config_of("--preset", "lenet", *option)


def test_an_lr_decay_the_one_cycle_schedule_would_ignore_is_refused():
    """Recorded in the config and never used, as an MLP option with LeNet would be; the
    lenet preset's 0.9 too, when its schedule is overridden."""
    for argv in (["--lr-schedule", "onecycle", "--lr-decay", "0.5"], ["--preset", "lenet", "--lr-schedule", "onecycle"]):
        with pytest.raises(HarnessError, match=r"^--lr-decay 0\.[59] is for the exponential schedule, not --lr-schedule onecycle"):
            config_of(*argv)
    assert config_of("--preset", "lenet", "--lr-schedule", "onecycle", "--lr-decay", "1").lr_schedule == "onecycle"


def test_mlp_presets_still_valid():
    assert config_of("--preset", "mathspp-mlp").activation == "leaky_relu"
    assert config_of("--preset", "lenet").hidden == []


@pytest.mark.parametrize("argv, message", [
    (["--seed", str(2**64)], "--seed must be at most"),
    (["--threads", str(2**40)], "--threads must be at most"),
    (["--model", "mlp", "--hidden", str(10**20)], "parameters; at most"),
    (["--model", "mlp", "--hidden", "10000000"], "parameters; at most"),
    (["--model", "mlp", "--hidden", ",".join(["1"] * 1001)], "1001 hidden layers"),
])
def test_out_of_range_options(argv, message):
    with pytest.raises(HarnessError, match=message):
        config_of(*argv)


def test_largest_seed_accepted():
    assert config_of("--seed", str(2**64 - 1)).seed == 2**64 - 1


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "two"}, {"LOCAL_RANK": "x"}, {"LOCAL_WORLD_SIZE": "0"}, {"RANK": ""}])
def test_malformed_launcher_variables(monkeypatch, env):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(HarnessError, match=next(iter(env))):
        init_distributed("cpu")


@pytest.mark.parametrize(("addr", "port", "error"), [
    ("127.0.0.1", "abc", "^MASTER_PORT='abc' is not a port number \\(1 to 65535\\): the port of rank 0's store, which the launcher sets$"),
    ("127.0.0.1", "99999", "^MASTER_PORT='99999' is not a port number"), ("127.0.0.1", "", "^MASTER_PORT='' is not a port number"),
    ("127.0.0.1", "\u00b2", "^MASTER_PORT='\u00b2' is not a port number"),  # a digit to str.isdigit, not to int()
    ("nonexistent.invalid.", "29500", "^MASTER_ADDR='nonexistent.invalid.' does not resolve \\(.+\\): every rank reaches rank 0's store by it$"),
])
def test_a_malformed_or_unknown_store_address_is_refused_before_the_join(monkeypatch, addr, port, error):
    """A malformed MASTER_PORT was reported as a failed join (exit 1, advice about start
    times); a MASTER_ADDR that does not resolve, after --timeout and some forty lines of
    torch's C++ log. .invalid never resolves (RFC 2606), with or without a network; the
    final dot keeps resolv.conf's search domains (one with a wildcard record) out."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", addr)
    monkeypatch.setenv("MASTER_PORT", port)
    with pytest.raises(HarnessError, match=error) as raised:
        init_distributed("cpu", timeout_s=5)
    assert raised.value.exit_status == (1 if addr != "127.0.0.1" else 2)  # a name service's failure is the system's


def test_resume_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "step-00000200.pt"
    with pytest.raises(HarnessError, match=f"--resume {missing}: no such checkpoint"):
        checkpoint_to_resume(None, tmp_path, str(missing), config_of("--preset", "lenet"))


def test_resume_path_that_is_a_directory_or_not_a_checkpoint(tmp_path):
    """A run's checkpoints/ directory, and its model.pt (weights only): the errors used to
    say "no such checkpoint file" of an existing directory, and name model.json, a file
    the user never gave, as an "unreadable checkpoint marker"."""
    config = config_of("--preset", "lenet")
    with pytest.raises(HarnessError, match=f"^--resume {tmp_path}: is a directory"):
        checkpoint_to_resume(None, tmp_path, str(tmp_path), config)
    (tmp_path / "model.pt").write_bytes(b"weights")
    with pytest.raises(HarnessError, match=f"^--resume {tmp_path / 'model.pt'}: not a checkpoint: it has no marker model.json beside it"):
        checkpoint_to_resume(None, tmp_path, str(tmp_path / "model.pt"), config)


@pytest.mark.parametrize("script", ["launch/torchrun.sh", "launch/accelerate.sh"])
@pytest.mark.parametrize("args", [["lenet", "--epochs", "1"], []])
def test_launcher_process_count_checked(script, args):
    result = subprocess.run(["bash", str(ROOT / script), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"N is the number of processes, got '{args[0] if args else ''}'" in result.stderr
    assert "Traceback" not in result.stderr


def test_setup_leaves_a_venv_file_alone(tmp_path):
    """launch/setup.sh ran `python3 -m venv .venv`, which fails on a .venv file (some shell
    plugins keep one), and then removed it. A file there is refused now, untouched (and
    .venv is removed only when the failed command made it)."""
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "setup.sh").write_bytes((ROOT / "launch" / "setup.sh").read_bytes())
    (tmp_path / ".venv").write_text("mine")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    result = subprocess.run(["bash", str(tmp_path / "launch" / "setup.sh")], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: .venv exists and is not a directory: move it or remove it, then run again"
    assert (tmp_path / ".venv").read_text() == "mine"


@pytest.mark.parametrize(("script", "wrapper"), [("torchrun.sh", "harness.torchrun"), ("accelerate.sh", "harness.accelerate_launch")])
def test_a_refused_option_under_a_launcher_exits_2_in_one_line(shards, tmp_path, script, wrapper):
    """torchrun exits 1 when ranks fail, whatever their status: a refused option reached the
    shell as 1, and with a traceback (accelerate launch: some forty lines). The launchers
    start them through harness.torchrun's handling, which passes the first failed rank's
    status on."""
    env = {"SHARDS": str(shards), "RUN_DIR": str(tmp_path / "run"), "MAIN_PROCESS_PORT": str(free_port())}
    result = run(["bash", ROOT / "launch" / script, "2", "lenet", "--batch-size", "7", "--device", "cpu"], timeout=120, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: --batch-size 7 is not divisible by the world size 2" in result.stdout + result.stderr
    assert f"{wrapper}: the ranks exited with status 2 (refused)" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("script", ["torchrun.sh", "accelerate.sh", "multinode.sh"])
def test_a_launchers_help_is_its_usage_and_harness_trains_options(script):
    """`launch/torchrun.sh --help` was refused as a process count of '--help'."""
    result = run(["bash", ROOT / "launch" / script, "--help"], timeout=60)
    assert result.returncode == 0 and result.stdout.startswith(f"usage: launch/{script} "), result.stdout[:300] + result.stderr[-2000:]
    assert result.stdout.count("usage: harness train") == 1 and "--resume" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="--device cuda is refused only where CUDA is absent")
def test_help_and_a_missing_gpu_are_printed_once_per_node_under_the_torchrun_launcher(shards, tmp_path):
    """Every rank parses the same command line and meets a missing GPU alike: two ranks
    printed `--help`'s 60 lines twice, and the CUDA error twice."""
    env = {**os.environ, "SHARDS": str(shards), "RUN_DIR": str(tmp_path / "run")}
    launcher = ["bash", str(ROOT / "launch" / "torchrun.sh"), "2"]
    result = run([*launcher, "--help"], timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("usage: harness train") == 1 and "--resume" in result.stdout, result.stdout
    result = run([*launcher, "--device", "cuda"], timeout=120, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("error: --device cuda was asked for but CUDA is not available") == 1, result.stderr


@pytest.mark.parametrize(("exitcode", "status"), [(2, 2), (75, 75), (1, 1), (-9, 137), (-15, 143)])
def test_harness_torchrun_reports_the_first_failed_ranks_status(exitcode, status):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from harness.launcher import first_failure_status

    failure = ProcessFailure(local_rank=0, pid=1, exitcode=exitcode, error_file="")
    assert first_failure_status(ChildFailedError("harness", {0: failure})) == status


@pytest.mark.parametrize(("args", "env", "problem"), [
    (["0", "127.0.0.1:29400", "1"], {}, "NNODES is the number of nodes, got '0'"),
    (["2", "127.0.0.1", "1"], {}, "HOST:PORT (RDZV_ENDPOINT) is the rendezvous' address, a port from 1 to 65535, got '127.0.0.1'"),
    (["2", "127.0.0.1:99999", "1"], {}, "HOST:PORT (RDZV_ENDPOINT) is the rendezvous' address, a port from 1 to 65535, got '127.0.0.1:99999'"),
    # a typo'd host: torchrun's retries took two silent minutes, then a traceback
    (["2", "nonexistent.invalid:29400", "1"], {}, "HOST:PORT (RDZV_ENDPOINT) nonexistent.invalid:29400: host nonexistent.invalid not found"),
    (["2", "127.0.0.1:29400", "0"], {}, "NPROC_PER_NODE is the number of ranks per node, got '0'"),
    (["2", "127.0.0.1:29400"], {}, "NNODES, HOST:PORT and NPROC_PER_NODE go together"),
    (["lenet", "--epochs", "1"], {}, "NNODES is the number of nodes, got ''"),
    (["--epochs", "1"], {"NNODES": "2", "RDZV_ENDPOINT": "127.0.0.1:29400", "NPROC_PER_NODE": "x"}, "NPROC_PER_NODE is the number of ranks per node, got 'x'"),
    (["2", "127.0.0.1:29400", "1"], {"RDZV_TIMEOUT": "soon"}, "RDZV_TIMEOUT is the seconds a node waits for the others, got 'soon'"),
])
def test_multinode_launcher_checks_its_numbers(args, env, problem):
    """NPROC_PER_NODE 0 or NNODES 0 ended in torchrun's AssertionError traceback, and options
    after the environment form were taken for the node count (a ValueError traceback)."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("NNODES", "RDZV_ENDPOINT", "NPROC_PER_NODE")}, **env}
    result = subprocess.run(["bash", str(ROOT / "launch" / "multinode.sh"), *args], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and result.stderr.startswith(f"launch/multinode.sh: {problem}"), result.stderr
    assert "Traceback" not in result.stderr


def launcher_without_venv_vars(script: str, *args, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PRESET", "MAIN_PROCESS_PORT")}, **(env or {})}
    return subprocess.run(["bash", str(ROOT / script), *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def test_launcher_environment_mistakes_are_one_line_each(tmp_path):
    """Found by an audit of the variables the scripts read: each was a traceback, a silence
    or a wrong default; each is one line now (and PRESET is the scripts' default, as for
    slurm/train.sbatch, where it used to be ignored)."""
    other = tmp_path / "other-venv"  # an active environment without the harness's packages
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(other)], check=True, timeout=120)
    activated = {"VIRTUAL_ENV": str(other), "PATH": f"{other / 'bin'}{os.pathsep}{os.environ['PATH']}"}  # as its bin/activate does
    result = launcher_without_venv_vars("launch/dev.sh", "--max-steps", "2", env=activated)
    assert result.returncode == 1 and result.stderr.startswith(f"error: the active virtual environment {other} lacks torch"), result.stderr
    result = launcher_without_venv_vars("launch/dev.sh", "--max-steps", "2", env={"PRESET": "no-such-preset"})
    assert result.returncode == 2 and "error: unknown preset 'no-such-preset'" in result.stderr, result.stderr
    result = launcher_without_venv_vars("launch/accelerate.sh", "2", env={"MAIN_PROCESS_PORT": "99999"})
    assert (result.returncode, result.stderr) == (2, "launch/accelerate.sh: MAIN_PROCESS_PORT is a port from 1 to 65535, got '99999'\n")
    result = launcher_without_venv_vars("slurm/train.sbatch", env={"SLURM_JOB_ID": ""})  # run with bash, not sbatch
    assert result.returncode == 2 and result.stderr.startswith("slurm/train.sbatch: not in a Slurm batch job"), result.stderr
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "setup.sh").write_bytes((ROOT / "launch" / "setup.sh").read_bytes())
    result = subprocess.run(["bash", str(tmp_path / "launch" / "setup.sh")], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "VIRTUAL_ENV": str(tmp_path / "gone")})
    assert (result.returncode, result.stderr) == (1, f"error: VIRTUAL_ENV={tmp_path / 'gone'} has no bin/python: deactivate it (or unset VIRTUAL_ENV), then run again\n")


def test_a_path_with_a_literal_tilde_is_the_home_directory(monkeypatch):
    """A `~` that reaches the harness unexpanded (quoted, or from a file of variables) made a
    folder named `~` in the working directory, and `wrote ~/runs/x` looked like home."""
    from harness.data.shard_set import default_cache_dir
    from harness.errors import given_path
    from harness.train import run_dir_option

    assert given_path("~/shards") == run_dir_option("~/shards") == Path.home() / "shards"
    monkeypatch.setenv("HARNESS_CACHE", "~/cache")
    assert default_cache_dir() == Path.home() / "cache"
    monkeypatch.setenv("HARNESS_CACHE", " ")  # blank: unset, not a folder named ' '
    assert default_cache_dir() == Path.home() / ".cache" / "mnist-harness"


def test_a_node_whose_partners_never_join_says_so_and_gives_up_after_rdzv_timeout(tmp_path):
    """launch/multinode.sh with the other node never started printed nothing at all, for
    torchrun's 600 s join timeout; RDZV_TIMEOUT sets it, and the wait is said first. (This
    node is at the rendezvous' address, so it hosts it: the timeout that applies.)"""
    port = free_port()
    started = time.monotonic()
    result = run(["bash", ROOT / "launch" / "multinode.sh", "2", f"127.0.0.1:{port}", "1", "--max-steps", "2"], timeout=120,
                 env={"RDZV_TIMEOUT": "3", "SHARDS": str(tmp_path)})
    assert result.stderr.startswith(f"launch/multinode.sh: waiting up to 3 s (RDZV_TIMEOUT) for 2 node(s) to join at 127.0.0.1:{port} (")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("harness.torchrun: RendezvousTimeoutError: "), result.stderr[-3000:]
    assert time.monotonic() - started < 60  # 3 s, and torchrun's start-up and shutdown


def multinode_alone(port: int, environment_form: bool) -> tuple[list[str], dict]:
    """launch/multinode.sh as the one node of a job, its numbers as arguments or in the environment."""
    numbers = {"NNODES": "1", "RDZV_ENDPOINT": f"127.0.0.1:{port}", "NPROC_PER_NODE": "1"}
    return (["launch/multinode.sh"], numbers) if environment_form else (["launch/multinode.sh", *numbers.values()], {})


@pytest.mark.parametrize("script", ["dev", "torchrun", "multinode", "multinode-environment"])
def test_launchers_take_options_without_a_preset(script, tmp_path):
    """`launch/dev.sh --max-steps 3` trains the default preset: the option used to be taken
    for the preset's name (`argument --preset: expected one argument`). A missing shard
    directory here shows that the options reached the harness."""
    command, env = {"dev": (["launch/dev.sh"], {}), "torchrun": (["launch/torchrun.sh", "1"], {})}.get(script) or \
        multinode_alone(free_port(), script == "multinode-environment")
    result = run(["bash", ROOT / command[0], *command[1:], "--max-steps", "3"], timeout=120, env={"SHARDS": str(tmp_path / "none"), **env})
    output = result.stdout + result.stderr
    assert result.returncode != 0 and f"error: {tmp_path / 'none'}: shard directory not found" in output, output[-3000:]
    assert "expected one argument" not in output


def test_a_lenet_run_that_recorded_mlp_options_is_still_read_and_resumed():
    """Runs made before the refusal recorded, say, activation tanh for lenet: predict and
    report still read their config, and the same run resumes without the option."""
    from dataclasses import asdict

    from harness.config import changed_fields, config_from_saved

    old = {**asdict(config_of("--preset", "lenet")), "activation": "tanh", "hidden": [7]}
    assert config_from_saved(old, "run/summary.json").activation == "tanh"
    assert changed_fields(old, config_of("--preset", "lenet")) == []
    assert changed_fields(old, config_of("--preset", "lenet", "--lr", "0.05")) == ["lr"]


def test_a_one_cycle_runs_length_cannot_change_on_resume():
    """--epochs and --max-steps may change on resume (a run extended), except under the
    one-cycle schedule, whose length they set: its saved schedule would end at the old
    length (the lr past its end, or PyTorch's error there), so such a resume is refused."""
    from dataclasses import asdict

    from harness.config import changed_fields

    one_cycle = asdict(config_of("--preset", "fast"))
    assert one_cycle["lr_schedule"] == "onecycle"
    assert changed_fields(one_cycle, config_of("--preset", "fast", "--epochs", "4")) == ["epochs"]
    assert changed_fields(one_cycle, config_of("--preset", "fast", "--max-steps", "100")) == ["max_steps"]
    exponential = asdict(config_of("--preset", "lenet"))
    assert changed_fields(exponential, config_of("--preset", "lenet", "--epochs", "30", "--max-steps", "100")) == []


def test_threads_split_the_usable_cores_between_a_nodes_ranks(monkeypatch):
    """--threads 0 (the default): the cores this process may run on (its affinity mask,
    which Slurm and taskset narrow), divided between the node's ranks, at least one each;
    a --threads given wins. torch is told, and the reason is returned for the start-up log."""
    import os

    import torch

    from harness.distributed import choose_threads

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 4, 6, 8, 10, 12})  # 7 cores of a larger machine
    try:
        assert choose_threads(0, 1) == (7, "7 cores / 1 local rank(s)") and torch.get_num_threads() == 7
        assert choose_threads(0, 2) == (3, "7 cores / 2 local rank(s)") and torch.get_num_threads() == 3
        assert choose_threads(0, 8) == (1, "7 cores / 8 local rank(s)") and torch.get_num_threads() == 1
        assert choose_threads(5, 8) == (5, "--threads") and torch.get_num_threads() == 5
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command,given,misspelt", [("train", [], "--epoch"), ("pack", ["--source", "src"], "--shards"),
                                                     ("show", ["--index", "0"], "--indx")])
def test_a_misspelt_option_is_one_line_naming_its_command(capsys, command, given, misspelt):
    """argparse reported a subcommand's unknown option with the top level's usage
    (`harness [-h] {pack,train,...}`), which lists no option at all; then with the
    command's whole usage (34 lines for train) above the error. Now one line, which names
    the command and where its options are listed."""
    from harness.cli import main

    with pytest.raises(SystemExit) as exit:
        main([command, *given, misspelt, "1"])
    err = capsys.readouterr().err
    assert exit.value.code == 2, err
    assert err == f"error: harness {command}: unrecognized arguments: {misspelt} 1 (harness {command} --help lists the options)\n"


@pytest.mark.parametrize("command,given,abbreviated", [("pack", ["--out", "x"], "--sour"), ("show", ["--index", "0"], "--shard"),
                                                       ("predict", ["run", "a.png"], "--js"), ("train", [], "--pre")])
def test_an_abbreviated_option_is_refused_by_every_command(capsys, command, given, abbreviated):
    """Only train refused `--pre` for --preset; `pack --sour`, `show --shard` and `predict
    --js` ran. One rule for every command: options are spelled out."""
    from harness.cli import main

    with pytest.raises(SystemExit) as exit:
        main([command, *given, abbreviated, "x"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: harness {command}: "), err
    assert "unrecognized arguments" in err or "required" in err, err


@pytest.mark.parametrize("args,option", [
    (["pack", "--source", "src", "--out", ""], "--out"), (["pack", "--source", ""], "--source"),
    (["pack", "--source", "download", "--download-dir", ""], "--download-dir"), (["pack", "--source", "download", "--mirror", ""], "--mirror"),
    (["train", "--preset", ""], "--preset"), (["train", "--resume", ""], "--resume"), (["train", "--shards", ""], "--shards"), (["train", "--shard-cache", " "], "--shard-cache"),
    (["show", "--shards", "", "--index", "0"], "--shards"), (["predict", "", "a.png"], "RUN_DIR_OR_CHECKPOINT"), (["report", ""], "RUN_DIR"),
])
def test_an_empty_path_or_preset_is_refused(capsys, tmp_path, monkeypatch, args, option):
    """An unset shell variable: `pack --out ""` put the shards in the working directory
    (the checkout, from its root), `--download-dir ""` the downloads, `--preset ""`
    trained the bare defaults, and `--resume ""` was refused per rank as "is a directory"."""
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith(f"error: harness {args[0]}: argument {option}: empty (an unset shell variable?)"), err
    assert list(tmp_path.iterdir()) == []


def test_download_options_with_a_source_directory_are_refused(capsys, tmp_path):
    """They were ignored: the directory was packed, and the mirror never asked."""
    from harness.cli import main

    rc = main(["pack", "--source", str(tmp_path), "--mirror", "http://127.0.0.1:9/", "--download-dir", str(tmp_path / "dl"),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: --download-dir and --mirror: for --source download only, not a directory ({tmp_path})\n", err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("given", ["", " "])
def test_an_empty_run_dir_is_refused(capsys, tmp_path, monkeypatch, given):
    """`--run-dir "$RUN_DIR"` with RUN_DIR unset was the working directory: the run wrote
    its model.pt, summary.json, checkpoints/ and event files there."""
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(["train", "--preset", "lenet", "--shards", str(tmp_path / "shards"), "--run-dir", given])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: harness train: argument --run-dir: empty (an unset shell variable?)"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "line"), [
    (["--shard-cache-limit-gb", "0"], "error: harness train: argument --shard-cache-limit-gb: '0': give a positive number of gigabytes"),
    (["--shard-cache-limit-gb", "nan"], "error: harness train: argument --shard-cache-limit-gb: 'nan': give a positive number of gigabytes"),
    (["--shard-cache-limit-gb", "1e-10"], "error: harness train: argument --shard-cache-limit-gb: '1e-10': give a positive number of gigabytes"),
    (["--shard-cache", "cache"], "error: --shard-cache: for shards from a URL; --shards {shards} is a local directory"),
    (["s3"], "error: --shards s3://bucket/mnist/: no reader for s3:// locations"),
    (["--shard-cache", "c", "--shard-cache-limit-gb", "1"], "error: --shard-cache and --shard-cache-limit-gb: for shards from a URL; --shards {shards} is a local directory"),
])
def test_shard_cache_options_are_checked_before_the_run_starts(shards, capsys, args, line):
    """A bad cache limit was refused after the run had named its directory (a second line,
    for a directory it never made; 1e-10 GB, no byte, passed a check of > 0); with a local
    shard directory both options were ignored. An unknown scheme keeps its own error."""
    if args == ["s3"]:
        shards, args = "s3://bucket/mnist/", ["--shard-cache", "c"]
    try:
        status, out, err = cli(capsys, "train", "--shards", str(shards), "--max-steps", "1", *args)
    except SystemExit as e:  # argparse's error ends the process (the harness's parser, as any)
        status, (out, err) = e.code, capsys.readouterr()
    assert (status, out) == (2, "") and err.startswith(line.format(shards=shards)) and err.count("\n") == 1, err


def test_a_preset_is_a_name_and_its_values_are_type_checked(tmp_path, monkeypatch):
    """--preset ../../x read a TOML file anywhere (and named the default run directory
    runs/../../x-TIME); a preset's values went unchecked (epochs = "one" was a traceback).
    A checkout's own preset files are checked as a run's saved config is."""
    from importlib import resources

    from harness import config as config_module
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match=r"^unknown preset '\.\./\.\./lenet' \(choose from fast, lenet"):
        config_module.load_preset("../../lenet")
    presets = tmp_path / "presets"
    presets.mkdir()
    monkeypatch.setattr(resources, "files", lambda package: presets)
    for text, message in [('epochs = "one"', "preset bad.toml: epochs is 'one', not of type int"),
                          ("lr = 1\nepochs =", "preset bad.toml: not a TOML file (Invalid value (at end of document))"),
                          ("lr = 1\n\xff", "preset bad.toml: not a TOML file ("),
                          ("hidden = [1.5]", "preset bad.toml: hidden is [1.5], not of type list")]:
        (presets / "bad.toml").write_bytes(text.encode("latin-1"))
        with pytest.raises(HarnessError) as refused:
            config_module.load_preset("bad")
        assert str(refused.value).startswith(message), str(refused.value)
    (presets / "good.toml").write_text("lr = 1\nepochs = 2\n")
    assert config_module.load_preset("good") == {"lr": 1.0, "epochs": 2} and type(config_module.load_preset("good")["lr"]) is float


def test_a_saved_configs_integer_for_a_float_field_is_bounded_as_a_float():
    """summary.json is JSON: an integer of 400 digits for --leaky-slope passed as an int (the
    float bound applied to floats only), and overflowed in the model's leaky_relu."""
    from harness.config import config_from_saved
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match=r"^summary.json: config.leaky_slope is 1000.*, too large for a float$"):
        config_from_saved({"leaky_slope": 10**400}, "summary.json")
    with pytest.raises(HarnessError, match=r"^summary.json: its config: --lr must be a finite number of at most 3.4e\+38"):
        config_from_saved({"lr": 10**39}, "summary.json")
    assert type(config_from_saved({"lr": 1}, "summary.json").lr) is float

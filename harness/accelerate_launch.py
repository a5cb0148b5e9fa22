"""`accelerate launch`, as launch/accelerate.sh starts it: with harness.torchrun's handling
of a SIGTERM before the ranks start, of the ranks' exit status, and of a refusal, a stop or
a signal in one line.

    python -m harness.accelerate_launch [accelerate launch's options] -m harness train [options]

With launch/accelerate.yaml (MULTI_GPU, also for one process and on a CPU-only machine)
accelerate starts the ranks through torchrun's elastic agent, and let its ChildFailedError
end it with a traceback and status 1: a refused option, which the ranks explain in one
line, was followed by some forty lines. (accelerate's single-process mode, without
torchrun, is not for this: there the first SIGTERM would only be noted for ranks that
have already started.)
"""

from __future__ import annotations

import sys

from harness.torchrun import run_launcher


def start_accelerate() -> None:
    from accelerate.commands.launch import main as accelerate_launch

    sys.argv[0] = "accelerate launch"  # its usage line and errors name the command a user knows
    accelerate_launch()


if __name__ == "__main__":
    sys.exit(run_launcher(start_accelerate, "harness.accelerate_launch"))

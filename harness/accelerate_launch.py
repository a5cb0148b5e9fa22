"""accelerate launch, as launch/accelerate.sh starts it: accelerate's options unchanged,
with harness.launcher's handling of a SIGTERM before the ranks start and of the ranks'
exit status.

    python -m harness.accelerate_launch [accelerate launch's options] -m harness train [options]

With launch/accelerate.yaml (MULTI_GPU, also for one process and on a CPU-only machine)
accelerate starts the ranks through torchrun's elastic agent, whose ChildFailedError would
otherwise end it with a traceback and status 1 after the ranks' one-line refusal.
accelerate's single-process mode, which starts the process itself, is not for this: there
a first SIGTERM would only be noted for ranks that have already started.
"""

from __future__ import annotations

import sys

from harness.launcher import run_launcher


def start_accelerate() -> None:
    from accelerate.commands.launch import main as accelerate_launch

    sys.argv[0] = "accelerate launch"  # its usage line and errors name the command a user knows
    accelerate_launch()


if __name__ == "__main__":
    sys.exit(run_launcher(start_accelerate, "harness.accelerate_launch"))

"""torchrun, as the launchers start it (launch/torchrun.sh, launch/multinode.sh,
slurm/train.sbatch): torchrun's options unchanged, with harness.launcher's handling of a
SIGTERM before the ranks start and of the ranks' exit status.

    python -m harness.torchrun [torchrun's options] -m harness train [options]
"""

from __future__ import annotations

import sys

from harness.launcher import run_launcher


def start_torchrun() -> None:
    from torch.distributed.run import main as torchrun

    torchrun()


if __name__ == "__main__":
    sys.exit(run_launcher(start_torchrun, "harness.torchrun"))

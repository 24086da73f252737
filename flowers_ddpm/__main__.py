"""`python -m flowers_ddpm ...`, `accelerate launch -m flowers_ddpm train ...` and the `flowers-ddpm` command: the
process entry point.

It installs the start-up signal handling before anything else is imported, so that a SIGTERM or Ctrl-C in the
first instants ends the process with one `stopped:` line and exit code 75 instead of a silent death by signal;
that is why `cli` is imported inside `main`. The training commands keep that handling through their own imports
and set-up (torch, diffusers, datasets: seconds; flowers_ddpm.cli) and hand the training steps to
flowers_ddpm.training.stopping.StopRequest.
"""

from __future__ import annotations

import sys
from typing import Optional

from .training.stopping import SignalStop, StopOutsideSteps


def main(argv: Optional[list[str]] = None) -> int:
    try:
        with StopOutsideSteps("during start-up, while the command was loading", "nothing was done yet: rerun "
                              "the same command"):
            from .cli import main as cli_main
    except SignalStop as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())

"""Which process this is, read from the launcher's environment (standard library only: the command line asks
before anything heavy is imported)."""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """Whether this is the main process (rank 0) of the launch, or the only one, read from the launcher's
    environment. For code that runs before an Accelerator exists or without one (the command line, the sweep
    around its trials): creating accelerate's PartialState to ask would fix the distributed set-up before the
    Accelerator (which honours ACCELERATE_USE_CPU) is built. With an Accelerator at hand, ask it."""
    return os.environ.get("RANK", "0") == "0"

"""`python -m flowers_ddpm ...` and `accelerate launch -m flowers_ddpm train ...` run the `flowers-ddpm` command."""

import sys

from .cli import main

sys.exit(main())

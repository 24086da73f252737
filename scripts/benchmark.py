"""`python scripts/benchmark.py --json results.json` runs `flowers-ddpm benchmark` (data, train and sample speed)."""
import sys

from flowers_ddpm.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))

"""`accelerate launch scripts/sweep.py --config base.yaml --grid ...` is `flowers-ddpm sweep ...` on every process."""
import sys

from flowers_ddpm.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))

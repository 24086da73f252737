"""`accelerate launch scripts/evaluate.py --model DIR ...` is `flowers-ddpm evaluate ...` on every process."""
import sys

from flowers_ddpm.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))

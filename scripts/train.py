"""`accelerate launch scripts/train.py --config configs/flowers64.yaml` runs `flowers-ddpm train` on every process."""
import sys

from flowers_ddpm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

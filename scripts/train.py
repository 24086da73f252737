"""`accelerate launch scripts/train.py --config configs/flowers64.yaml` runs `flowers-ddpm train` on every process."""
import sys

from flowers_ddpm.__main__ import main  # installs the start-up signal handling before the heavy imports

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

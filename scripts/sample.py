"""`python scripts/sample.py --model DIR --num_images 16` is `flowers-ddpm sample ...`."""
import sys

from flowers_ddpm.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))

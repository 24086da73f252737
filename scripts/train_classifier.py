"""`accelerate launch scripts/train_classifier.py --train_data_dir DIR --output_dir OUT ...` runs
`flowers-ddpm train-classifier` on every process."""
import sys

from flowers_ddpm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-classifier", *sys.argv[1:]]))

"""`accelerate launch scripts/train_classifier.py --train_data_dir DIR --output_dir OUT ...` runs
`flowers-ddpm train-classifier` on every process."""
import sys

from flowers_ddpm.__main__ import main  # installs the start-up signal handling before the heavy imports

if __name__ == "__main__":
    sys.exit(main(["train-classifier", *sys.argv[1:]]))

"""`python scripts/soak_resume.py --kills 50 --seed 0 [--workdir DIR]` interrupts one training run many times, resumes
it each time and compares it with an uninterrupted run (flowers_ddpm.experiments.soak)."""
import sys

from flowers_ddpm.experiments.soak import main

if __name__ == "__main__":
    sys.exit(main())

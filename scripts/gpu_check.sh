#!/usr/bin/env bash
# The GPU check of issue 18 in one call, from a fresh clone: installs the package when its dependencies are missing,
# then runs `flowers-ddpm benchmark --suite gpu`, which prints one table and writes one JSON (docs/benchmarks.md).
#
#   scripts/gpu_check.sh                       # on one H100/H200: a few minutes; writes gpu_check.json
#   scripts/gpu_check.sh --dry_run --device cpu --json /tmp/check.json   # tiny sizes, seconds on a CPU
#
# Extra arguments go to `flowers-ddpm benchmark` (--json, --work_dir, --device, --peak_tflops, --dry_run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import flowers_ddpm.cli, torch, diffusers, accelerate, datasets" >/dev/null 2>&1; then
    echo "installing flowers-ddpm and its dependencies ($PYTHON -m pip install -e .)" >&2
    "$PYTHON" -m pip install -q -e .
fi
case " $* " in
    *" --json "*|*" --json="*) exec "$PYTHON" -m flowers_ddpm benchmark --suite gpu "$@" ;;
    *) exec "$PYTHON" -m flowers_ddpm benchmark --suite gpu --json gpu_check.json "$@" ;;
esac

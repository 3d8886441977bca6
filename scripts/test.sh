#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# The real-Slurm tests (minutes of sbatch jobs) are .ci/run's own stage: tests/test_slurm.py.
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests --ignore=tests/test_slurm.py "$@"

#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# The real-Slurm, fault-injection and benchmark-smoke tests (minutes of jobs and launches each)
# are .ci/run's own stage, so this stays under 20 minutes on 2 cores.
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests --ignore=tests/test_slurm.py \
  --ignore=tests/test_faults.py --ignore=tests/test_bench.py \
  --ignore=tests/test_zero3_masters.py "$@"

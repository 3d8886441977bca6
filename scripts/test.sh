#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# The tests in tests/slow_stage.txt (real Slurm, fault injection, benchmark smoke tests, the
# heaviest launches) are .ci/run's own stage, so this stays under 20 minutes on 2 cores.
skip=()
while read -r t; do
  case "$t" in ''|'#'*) ;; *::*) skip+=(--deselect "$t") ;; *) skip+=(--ignore "$t") ;; esac
done < tests/slow_stage.txt
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "${skip[@]}" "$@"

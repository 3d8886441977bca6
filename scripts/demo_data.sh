#!/usr/bin/env bash
# The model and token shards the demo and the replay experiment train on (idempotent; run from the
# repo root after scripts/setup.sh): SmolLM2-135M as an HF dir, German and English shards.
set -euo pipefail
PY=.venv/bin/python
MODEL=work/models/smollm2-135m
$PY scripts/get_smollm2.py "$MODEL"
if [ ! -f work/data/de.idx ] || [ ! -f work/data/en.idx ]; then
  $PY scripts/make_demo_corpora.py work/corpus
  for lang in de en; do
    .venv/bin/megacpt prepare --input "work/corpus/$lang.jsonl" --tokenizer "$MODEL" \
      --output "work/data/$lang" --valid-fraction 0.1 --workers 2
  done
fi

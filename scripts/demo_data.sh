#!/usr/bin/env bash
# The model and token shards the demo and the replay experiment train on (idempotent; run from the
# repo root after scripts/setup.sh):
#   bash scripts/demo_data.sh                # SmolLM2-135M as an HF dir, shards work/data/{de,en}
#   bash scripts/demo_data.sh gemma3-270m    # Gemma 3 270M (needs `bash scripts/setup.sh gemma3`),
#                                            # shards work/data/gemma3/{de,en}
# Each model has its own shards: token ids only mean something to the tokenizer that made them.
set -euo pipefail
PY=.venv/bin/python
case "${1:-smollm2-135m}" in
  smollm2-135m)
    MODEL=work/models/smollm2-135m DATA=work/data BOS=()
    $PY scripts/get_smollm2.py "$MODEL" ;;
  gemma3-270m)
    # Gemma was pre-trained with <bos> opening every document; SmolLM2 has no such convention.
    MODEL=work/models/gemma3-270m DATA=work/data/gemma3 BOS=(--bos)
    $PY scripts/get_gemma3.py "$MODEL" ;;
  *)
    echo "error: unknown demo model '$1' (smollm2-135m or gemma3-270m)" >&2; exit 2 ;;
esac
if [ ! -f "$DATA/de.idx" ] || [ ! -f "$DATA/en.idx" ]; then
  $PY scripts/make_demo_corpora.py work/corpus
  for lang in de en; do
    .venv/bin/megacpt prepare --input "work/corpus/$lang.jsonl" --tokenizer "$MODEL" \
      --output "$DATA/$lang" --valid-fraction 0.1 --workers 2 "${BOS[@]}"
  done
fi

#!/usr/bin/env bash
# The model and token shards the demo and the replay experiment train on (idempotent; run from the
# repo root after scripts/setup.sh):
#   bash scripts/demo_data.sh                # SmolLM2-135M as an HF dir, shards
#                                            # work/data/{de,en,en_heldout_valid}, probes work/tasks
#   bash scripts/demo_data.sh gemma3-270m    # Gemma 3 270M (needs `bash scripts/setup.sh gemma3`),
#                                            # shards work/data/gemma3/..., probes work/tasks_gemma3
# Each model has its own shards: token ids only mean something to the tokenizer that made them.
set -euo pipefail
PY=.venv/bin/python
case "${1:-smollm2-135m}" in
  smollm2-135m)
    MODEL=work/models/smollm2-135m DATA=work/data TASKS=work/tasks BOS=()
    $PY scripts/get_smollm2.py "$MODEL" ;;
  gemma3-270m)
    # Gemma was pre-trained with <bos> opening every document; SmolLM2 has no such convention.
    MODEL=work/models/gemma3-270m DATA=work/data/gemma3 TASKS=work/tasks_gemma3 BOS=(--bos)
    $PY scripts/get_gemma3.py "$MODEL" ;;
  *)
    echo "error: unknown demo model '$1' (smollm2-135m or gemma3-270m)" >&2; exit 2 ;;
esac
# Shards: de and en (train + _valid, the new and the replayed original domain) and
# en_heldout_valid (English manual pages: the original domain as evaluated, disjoint from en and
# never trained on). Each step runs only when its output is missing, so a machine that already has
# de and en still gets en_heldout_valid.
if [ ! -f "$DATA/de.idx" ] || [ ! -f "$DATA/en.idx" ] || [ ! -f "$DATA/en_heldout_valid.idx" ]; then
  $PY scripts/make_demo_corpora.py work/corpus
fi
for lang in de en; do
  if [ ! -f "$DATA/$lang.idx" ]; then
    .venv/bin/megacpt prepare --input "work/corpus/$lang.jsonl" --tokenizer "$MODEL" \
      --output "$DATA/$lang" --valid-fraction 0.1 --workers 2 "${BOS[@]}"
  fi
done
if [ ! -f "$DATA/en_heldout_valid.idx" ]; then
  .venv/bin/megacpt prepare --input work/corpus/en_heldout.jsonl --tokenizer "$MODEL" \
    --output "$DATA/en_heldout_valid" --workers 2 "${BOS[@]}"
fi
# Probes (docs/TASKS.md): lm-eval tasks from the held-out text of each domain, cut with the model's
# tokenizer; e.g. `megacpt eval --model M --tasks probe_de_continuation,probe_en_cloze --include-path $TASKS`.
# German: continuation (SmolLM2-135M gets German cloze words right only ~5 % of the time, too
# little to show a change); English: cloze (4x cheaper than continuation, ~20 % right).
# Always rewritten (seconds; the same bytes for the same shards): the YAML names its data file by
# absolute path, which a copy of work/ from another checkout would get wrong.
probe() {  # probe NAME KIND N SHARD
  .venv/bin/megacpt make-task --from "$4" --tokenizer "$MODEL" --kind "$2" --n "$3" --max-tokens 64 \
    --seed 1234 --output "$TASKS" --name "$1"
}
probe probe_de_continuation continuation 200 "$DATA/de_valid"
probe probe_en_cloze cloze 300 "$DATA/en_heldout_valid"

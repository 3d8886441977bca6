#!/usr/bin/env bash
# The main job: continued pre-training of the real SmolLM2-135M on German text with 25 % English
# replay, 2 CPU ranks, DeepSpeed ZeRO-3, under the deepspeed launcher. Everything comes from this
# machine (no downloads besides PyPI packages). Each invocation trains into a new run directory.
#   bash scripts/demo.sh [--model smollm2-135m|gemma3-270m] [--set KEY=VALUE ...]
# --model gemma3-270m runs the same recipe on the Gemma 3 270M base (configs/demo_gemma3.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=smollm2-135m
case "${1:-}" in
  --model) MODEL=${2:?--model needs a name}; shift 2 ;;
  --model=*) MODEL=${1#--model=}; shift ;;
esac
case "$MODEL" in
  smollm2-135m) CONFIG=configs/demo_smollm2.yaml RUN_NAME=demo; bash scripts/setup.sh ;;
  gemma3-270m) CONFIG=configs/demo_gemma3.yaml RUN_NAME=demo-gemma3; bash scripts/setup.sh gemma3 ;;
  *) echo "error: unknown demo model '$MODEL' (smollm2-135m or gemma3-270m)" >&2; exit 2 ;;
esac
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
bash scripts/demo_data.sh "$MODEL"
RUN_DIR=${RUN_DIR:-work/runs/$RUN_NAME-$(date +%Y%m%d-%H%M%S)}
.venv/bin/deepspeed --num_gpus 2 --module megacpt.train "$CONFIG" --set "run_dir=$RUN_DIR" "$@"
echo "run directory: $RUN_DIR (metrics.jsonl, tensorboard/, checkpoints/)"

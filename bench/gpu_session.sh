#!/usr/bin/env bash
# The benchmarks and GPU-only tests of one session on a lent GPU machine, in one command.
#
#   bash bench/gpu_session.sh PHASE [PHASE ...]      (results and one log under $OUT)
#
# Wheels the device image lacks, put into .whl/ here and carried (device README): deepspeed 0.19.8
# (`pip wheel --no-deps --no-build-isolation deepspeed==0.19.8`), pydantic 2.14.3, pydantic_core
# 2.50.4 (cp312 manylinux), annotated-types 0.8.0, typing-inspection 0.4.5, hjson 3.1.0, and
# optionally liger-kernel 0.8.5 (a peer in the loss benchmark).
# Phases: setup (wheels from .whl/, megacpt from the source tree; see bench/README.md "GPU"),
# smoke, kernels, loss, profile, train1b, peers1b, compile1b, zero3c, offload. Each phase runs with a time limit and
# the next one runs whatever happened, so one failure does not cost the rest of the lease.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/megacpt-gpu-out}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MEGACPT_CACHE=${MEGACPT_CACHE:-/tmp/megacpt-cache}
PY=${PY:-python3}
TAG=${TAG:-$(date +%Y%m%d)}
DEV=${DEV:-gpu}

run() {  # run NAME LIMIT_S CMD...
  local name=$1 limit=$2
  shift 2
  local t0
  t0=$(date +%s)
  echo "=== [$name] $(date -u +%H:%M:%S) $*" | tee -a "$LOG"
  timeout --kill-after=20 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== [$name] rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
  return $rc
}

bench() { "$PY" -m megacpt bench "$@"; }

for phase in "$@"; do
  case "$phase" in
    setup)
      if [ -d .whl ]; then
        run wheels 300 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
          --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
      fi
      # No package index there and no build backend to install with: make the source tree
      # importable as it is (kernels/ is installed as megacpt.kernels by setup.py).
      [ -e megacpt/kernels ] || ln -s ../kernels megacpt/kernels
      export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
      run env 120 bash -c "nvidia-smi || true; $PY -c 'import torch, triton, deepspeed, transformers, megacpt.kernels;
print(torch.__version__, torch.version.cuda, triton.__version__, deepspeed.__version__, transformers.__version__);
print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no cuda\")'"
      ;;
    smoke)  # a tiny shape end to end through the trainer and both peers: catches setup problems fast
      run smoke 300 bash -c "$PY -m megacpt bench train --model tiny --seq-len 256 --nproc 1 --zero-stage 1 \
        --warmup 1 --steps 2 --peers --json $OUT/smoke.json"
      ;;
    kernels)
      run kernels 400 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "gpu or aot" -rs
      ;;
    loss)
      run loss 300 bash -c "$PY -m megacpt bench loss --device cuda --repeats 5 --warmup 2 \
        --json $OUT/loss-$DEV-$TAG.json"
      ;;
    profile)
      run profile 300 "$PY" bench/profile_gpu.py --shape llama3-1b --seq-len 4096 --json "$OUT/profile-llama3-1b-$DEV-$TAG.json"
      ;;
    train1b)  # megacpt alone: MFU at the issue's shape, two micro-batch sizes
      run train1b 420 bash -c "$PY -m megacpt bench train --model llama3-1b --seq-len 4096 --micro-batch 1 \
        --nproc 1 --zero-stage 1 --warmup 3 --steps 10 --json $OUT/train-llama3-1b-$DEV-mb1-$TAG.json"
      ;;
    peers1b)  # model.compile is megacpt's own switch (the peers' DeepSpeed JSON is the same)
      run peers1b 420 bash -c "$PY -m megacpt bench train --model llama3-1b --seq-len 4096 --micro-batch 1 \
        --nproc 1 --zero-stage 1 --warmup 4 --steps 6 --peers --repeats 2 --set model.compile=true \
        --json $OUT/train-llama3-1b-$DEV-peers-$TAG.json"
      ;;
    peers1b-gas4)
      run peers1b-gas4 300 bash -c "$PY -m megacpt bench train --model llama3-1b --seq-len 4096 --micro-batch 1 \
        --nproc 1 --zero-stage 1 --grad-accum 4 --warmup 3 --steps 4 --peers --set model.compile=true \
        --json $OUT/train-llama3-1b-$DEV-peers-gas4-$TAG.json"
      ;;
    sweep)  # megacpt alone: eager ZeRO-1, compiled ZeRO-0, compiled ZeRO-1 with 4 micro-batches per step
      run sweep-eager 150 bash -c "$PY -m megacpt bench train --model llama3-1b --seq-len 4096 --nproc 1 \
        --zero-stage 1 --warmup 3 --steps 8 --json $OUT/train-llama3-1b-$DEV-zero1-eager-$TAG.json"
      run sweep-zero0 150 bash -c "$PY -m megacpt bench train --model llama3-1b --seq-len 4096 --nproc 1 \
        --zero-stage 0 --warmup 4 --steps 8 --set model.compile=true \
        --json $OUT/train-llama3-1b-$DEV-zero0-compile-$TAG.json"
      run sweep-gas4 180 bash -c "$PY -m megacpt bench train --model llama3-1b --seq-len 4096 --nproc 1 \
        --zero-stage 1 --grad-accum 4 --warmup 3 --steps 5 --set model.compile=true \
        --json $OUT/train-llama3-1b-$DEV-zero1-compile-gas4-$TAG.json"
      ;;
    compile1b)
      run compile1b 500 bash -c "$PY -m megacpt bench train --model llama3-1b --seq-len 4096 --micro-batch 1 \
        --nproc 1 --zero-stage 1 --warmup 4 --steps 10 --set model.compile=true \
        --json $OUT/train-llama3-1b-$DEV-compile-$TAG.json"
      ;;
    zero3c)  # ZeRO-3 eager vs compiled pointwise code (model.compile under ZeRO-3), peers alongside
      run zero3c 560 bash -c "$PY -m megacpt bench train --model llama3-1b --seq-len 4096 --micro-batch 1 \
        --nproc 1 --zero-stage 3 --warmup 3 --steps 5 --peers --set model.compile=true \
        --json $OUT/train-llama3-1b-$DEV-zero3-compile-$TAG.json"
      ;;
    offload)  # the largest shape we try with ZeRO-3 and optimizer + parameters offloaded to CPU
      run offload 560 bash -c "$PY -m megacpt bench train --model ${OFFLOAD_MODEL:-llama3-8b} --seq-len 4096 \
        --micro-batch 1 --nproc 1 --zero-stage 3 --warmup 1 --steps 2 --set model.activation_checkpointing=true \
        --set deepspeed.zero_optimization.offload_optimizer.device=cpu \
        --set deepspeed.zero_optimization.offload_param.device=cpu \
        --set deepspeed.zero_force_ds_cpu_optimizer=false --set deepspeed.optimizer.params.fused=false \
        --json $OUT/train-${OFFLOAD_MODEL:-llama3-8b}-$DEV-offload-$TAG.json"
      ;;
    *)
      echo "unknown phase $phase" | tee -a "$LOG"
      ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)" | tee -a "$LOG"

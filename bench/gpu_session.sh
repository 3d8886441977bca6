#!/usr/bin/env bash
# One GPU session that fits a device lease: ≤ 8 minutes on one H100/H200, one JSON per run.
#
#   bash bench/gpu_session.sh [--dry-run] [PART ...]     on the device (default: anatomy train loss fp8)
#   bash bench/gpu_session.sh --fetch-wheels             here, before: the wheels the device lacks, into .whl/
#
# Parts, in this order, each under its own `timeout` inside an overall budget
# ($MEGACPT_GPU_BUDGET_S, default 470 s); a part that would not fit what is left is recorded as
# skipped, and a part that fails or times out leaves the others' results:
#   setup    (always, first) wheels from .whl/ into /tmp/site (no index there), the source tree
#            importable, the model's random-weight HF dir built; then the session JSON starts with versions, commit, source digest and
#            nvidia-smi's name / clocks / power limit (again at the end)
#   anatomy  bench/step_anatomy.py: forward / backward / optimizer / host gaps of megacpt's own
#            step from CUDA events, one profiled step binned by kernel kind (Llama-3.2-1B shape,
#            seq 4096, ZeRO-1, compiled blocks)
#   train    megacpt bench train against peer a, interleaved A B A B, 2 rounds × 10 timed steps:
#            tokens/s, MFU (FLOPs per token and the peak in the JSON), peak memory
#   loss     megacpt bench loss at the 1B head (N 4096, H 2048, V 128,256): every implementation
#            available (eager, torch's chunked, ours, and any newer one `--impl` lists)
#   fp8      only if time remains: megacpt alone with precision: fp8 at the train part's shape;
#            its losses are compared with the bf16 run's (same init, same tokens) in the summary
#   (not by default) kernels: the GPU kernel tests; zero3: the train part's shape under ZeRO-3
#
# Everything lands in $OUT (the device tool copies it back; at most 8 files come back):
# gpu-session-<run id>.json (rewritten after every part) and gpu-session-<run id>.log.
# --dry-run (or MEGACPT_GPU_DRY=1): every part's command on the tiny shape on CPU in seconds
# (fp8 is then refused with its one-line error, which is what the CPU must do), then the schema
# check; tests/test_bench.py runs it. Exit status: 0 when the session JSON passes the check.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=${MEGACPT_GPU_DRY:-0}
PARTS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --fetch-wheels) FETCH=1 ;;
    *) PARTS+=("$arg") ;;
  esac
done
PY=${PY:-python3}

fetch_wheels() {  # here, with an index: what the device image lacks (bench/README.md "GPU session")
  local pyv=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
             --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  mkdir -p .whl
  "$PY" -m pip download -q --no-deps "${pyv[@]}" -d .whl torchao==0.18.0 pydantic==2.14.4 pydantic_core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0 transformers==5.23.0 liger-kernel==0.8.5 || return 1
  # DeepSpeed publishes no wheel; build its pure-Python one without the ops (JIT-built there).
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 || return 1
  ls -la .whl
}
if [ "${FETCH:-0}" = 1 ]; then fetch_wheels; exit $?; fi

[ ${#PARTS[@]} -gt 0 ] || PARTS=(anatomy train loss fp8)
OUT=${OUT:-/tmp/megacpt-gpu-out}
mkdir -p "$OUT"
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)
SESSION="$OUT/gpu-session-$RUN_ID.json"
LOG="$OUT/gpu-session-$RUN_ID.log"
# The parts' own JSON files stay out of $OUT (its file count is limited); the session JSON embeds them.
WORK=${WORK:-$(mktemp -d /tmp/megacpt-gpu-XXXXXX)}
# A dry run on a shared CPU host can be many times slower than the device: its limits are wider
# (it checks the plumbing and the schema, not the lease).
if [ "$DRY" = 1 ]; then SCALE=6; else SCALE=1; fi
BUDGET_S=${MEGACPT_GPU_BUDGET_S:-$(( 470 * SCALE ))}
T0=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MEGACPT_CACHE=${MEGACPT_CACHE:-/tmp/megacpt-cache}

if [ "$DRY" = 1 ]; then
  MODEL=tiny SEQ=32 ROUNDS=1 WARMUP=1 STEPS=1 DEVICE=cpu
  LOSS_ARGS=(--device cpu --shape 64,32,256 --repeats 1 --warmup 0)
  COMPILE=() COMPILE_SET=()
else
  MODEL=llama3-1b SEQ=4096 ROUNDS=2 WARMUP=3 STEPS=10 DEVICE=cuda
  LOSS_ARGS=(--device cuda --shape 4096,2048,128256 --dtype bf16 --repeats 5 --warmup 2)
  COMPILE=(--compile) COMPILE_SET=(--set model.compile=true)
fi
TRAIN_ARGS=(--model "$MODEL" --seq-len "$SEQ" --micro-batch 1 --nproc 1 --warmup "$WARMUP" --steps "$STEPS"
            "${COMPILE_SET[@]}" --cache-dir "$MEGACPT_CACHE/shapes")

session() { "$PY" bench/gpu_session.py "$@"; }

# part NAME LIMIT_S MIN_S PART_JSON|- CMD...: run CMD under `timeout` (at most what the budget
# has left), or skip it when less than MIN_S is left; record the outcome in the session JSON.
part() {
  local name=$1 limit=$(( $2 * SCALE )) min=$3 json=$4
  shift 4
  local left=$(( BUDGET_S - ($(date +%s) - T0) - 10 ))
  if [ "$left" -lt "$min" ]; then
    echo "=== [$name] skipped: ${left} s of the budget left, it needs ${min} s" | tee -a "$LOG"
    session skip "$SESSION" --part "$name" --reason "${left} s of the ${BUDGET_S} s budget left, the part needs ${min} s"
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  local offset t0 rc
  offset=$(stat -c %s "$LOG" 2>/dev/null || echo 0)
  t0=$(date +%s)
  echo "=== [$name] $(date -u +%H:%M:%S) limit ${limit} s: $*" | tee -a "$LOG"
  timeout --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "=== [$name] rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
  local jsonarg=()
  [ "$json" = - ] || jsonarg=(--json "$json")
  session record "$SESSION" --part "$name" --rc "$rc" --seconds "$(( $(date +%s) - t0 ))" --limit "$limit" \
    "${jsonarg[@]}" --log "$LOG" --log-offset "$offset" -- "$@"
}

setup() {
  # No package index on the device: the wheels travel in .whl/ (carry it). The source tree is
  # made importable as it is (kernels/ is installed as megacpt.kernels by setup.py).
  if [ "$DRY" = 1 ]; then
    echo "dry run: this checkout's environment as it is"
    return 0
  fi
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || return 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
  fi
  if ! "$PY" -c "import megacpt.kernels" 2>/dev/null; then
    [ -e megacpt/kernels ] || ln -s ../kernels megacpt/kernels
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PY" -c "import megacpt.kernels, deepspeed, transformers; print('imports ok')" || return 1
  # The random-weight model dir every part reads, built once here so that no part's limit pays for it.
  timeout 180 "$PY" -c "from megacpt.bench.shapes import resolve_model; print(resolve_model('$MODEL', 'bfloat16', \
    '$MEGACPT_CACHE/shapes')[0])"
}

touch "$LOG"
# Setup first, in this shell (its exports are for every part after it), so that the versions the
# session records are those of the carried wheels.
t0=$(date +%s)
echo "=== [setup] $(date -u +%H:%M:%S)" | tee -a "$LOG"
setup >>"$LOG" 2>&1
setup_rc=$?
echo "=== [setup] rc=$setup_rc in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
parts_csv=$(IFS=,; echo "${PARTS[*]}")
session start "$SESSION" --run-id "$RUN_ID" --budget "$BUDGET_S" --parts "$parts_csv" $([ "$DRY" = 1 ] && echo --dry-run) \
  || { echo "cannot write $SESSION" | tee -a "$LOG"; exit 1; }
session record "$SESSION" --part setup --rc "$setup_rc" --seconds "$(( $(date +%s) - t0 ))" --limit 0 \
  --log "$LOG" --log-offset 0 -- setup
for name in "${PARTS[@]}"; do
  case "$name" in
    anatomy) part anatomy 170 60 "$WORK/anatomy.json" "$PY" bench/step_anatomy.py --model "$MODEL" --seq-len "$SEQ" \
        --zero-stage 1 "${COMPILE[@]}" --warmup "$WARMUP" --steps 5 --cache-dir "$MEGACPT_CACHE/shapes" \
        --json "$WORK/anatomy.json" ;;
    train) part train 280 150 "$WORK/train.json" "$PY" -m megacpt bench train "${TRAIN_ARGS[@]}" --zero-stage 1 \
        --peers a --repeats "$ROUNDS" --json "$WORK/train.json" ;;
    loss) part loss 100 30 "$WORK/loss.json" "$PY" -m megacpt bench loss "${LOSS_ARGS[@]}" --json "$WORK/loss.json" ;;
    fp8) part fp8 120 80 "$WORK/fp8.json" "$PY" -m megacpt bench train "${TRAIN_ARGS[@]}" --zero-stage 1 \
        --precision fp8 --repeats 1 --json "$WORK/fp8.json" ;;
    kernels) part kernels 300 60 - "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "gpu or aot" -rs ;;
    zero3) part zero3 240 150 "$WORK/zero3.json" "$PY" -m megacpt bench train "${TRAIN_ARGS[@]}" --zero-stage 3 \
        --repeats 1 --json "$WORK/zero3.json" ;;
    *) echo "unknown part $name (parts: anatomy train loss fp8 kernels zero3; setup always runs)" | tee -a "$LOG" ;;
  esac
done
session finish "$SESSION"
echo "=== done $(date -u +%H:%M:%S), $(( $(date +%s) - T0 )) s: $SESSION" | tee -a "$LOG"
session check "$SESSION" | tee -a "$LOG"
exit "${PIPESTATUS[0]}"

#!/bin/bash
# megacpt on Slurm: one training rank per Slurm task, started by srun.
#
#   sbatch [SBATCH OPTIONS] slurm/cpt.sh [--preflight] CONFIG.yaml [--set key=value ...]
#
# Every #SBATCH line below is a default for a GPU cluster; the same option on the sbatch command
# line wins, e.g. a 4-node job:      sbatch --nodes=4 slurm/cpt.sh configs/x.yaml
#                 a CPU cluster:     sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=8 ...
#
# What it does (and nothing else):
#   1. resolves the config (with the --set overrides) once, to fail fast on bad input and to
#      find the run directory; the job's log then goes to RUN_DIR/logs/<job name>-<job id>.out;
#   2. MASTER_ADDR = first host of the allocation, MASTER_PORT derived from the job id;
#   3. optionally runs `megacpt preflight` as its own srun step (--preflight or MEGACPT_PREFLIGHT=1);
#   4. runs `srun python -m megacpt.train CONFIG ...`: every task is one rank; rank, world size and
#      local rank come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (megacpt/train/dist.py);
#   5. preemption / time limit: USR1 (sent by this shell to itself MEGACPT_STOP_LEAD seconds before
#      the job's end time, or `scancel --signal=USR1 --batch`, or an sbatch --signal) reaches only this shell; it is forwarded to the step, the ranks agree to stop after the
#      current step, write a checkpoint and exit 0; the job is then requeued (`scontrol requeue`)
#      if the run is unfinished and this attempt moved the checkpoint forward, and the requeued
#      job resumes from RUN_DIR/checkpoints/latest. TERM sent to this shell alone is forwarded the
#      same way but does not requeue (a user's scancel must stop the job; on preemption Slurm
#      requeues by itself). A run stopped by a signal and not requeued exits 138 (USR1) or 143
#      (TERM), never 0, so `--dependency=afterok` jobs do not start on an unfinished run.
#      Bad arguments or a config that does not load: exit 2 before any srun step.
#
# Why srun with one rank per task, not the deepspeed launcher or torchrun: Slurm already starts,
# places, binds and accounts for every process, forwards our signal to each rank, and kills the
# whole step when one rank fails (--kill-on-bad-exit). The deepspeed launcher would add ssh/pdsh
# fan-out that Slurm does not track, dies on SIGUSR1 and kills its ranks a grace period after
# SIGTERM, so a preempted job would lose its last steps; torchrun's elastic agent adds a second
# restart policy on top of Slurm's requeue. One task per rank has neither problem.
#
# Environment knobs (all optional):
#   MEGACPT_PYTHON      interpreter with megacpt installed (default: python on PATH; sbatch passes
#                       the submitting shell's environment, so an activated venv just works)
#   MEGACPT_PREFLIGHT=1 run the preflight first (same as --preflight)
#   MEGACPT_REQUEUE=0   never requeue (default 1: requeue after a USR1 stop of an unfinished run)
#   MEGACPT_LOG_DIR     where the job log goes (default RUN_DIR/logs; empty: keep Slurm's --output)
#   MEGACPT_MASTER_PORT override the derived port
#   MEGACPT_STOP_LEAD   seconds before the job's end time at which the run checkpoints and stops
#                       (default 600). Not `#SBATCH --signal`: Slurm fixes that at submission, so a
#                       job whose --time is at or under the lead would be signalled at once and
#                       requeue itself every minute; this shell instead refuses a job too short
#                       for the lead plus a minute (exit 2, one line, no requeue).
#   NCCL_*, TORCH_NCCL_*, GLOO_SOCKET_IFNAME, ... pass through to every rank unchanged.
#
#SBATCH --job-name=megacpt
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -uo pipefail

say() { printf 'megacpt[%s %s]: %s\n' "${SLURM_JOB_ID:-?}" "$(date -u +%T)" "$*"; }
die() { printf 'megacpt[%s]: error: %s\n' "${SLURM_JOB_ID:-?}" "$*" >&2; exit 2; }

# ---- arguments --------------------------------------------------------------------------------
preflight="${MEGACPT_PREFLIGHT:-0}"
if [[ "${1:-}" == "--preflight" ]]; then
    preflight=1
    shift
fi
if [[ $# -lt 1 || "$1" == -* ]]; then
    die "usage: sbatch [SBATCH OPTIONS] slurm/cpt.sh [--preflight] CONFIG.yaml [--set key=value ...]"
fi
config="$1"
shift
train_args=("$@")
[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a Slurm job; submit with: sbatch slurm/cpt.sh CONFIG.yaml"
[[ -f "$config" ]] || die "config file $config not found (relative paths are relative to $PWD)"
py="${MEGACPT_PYTHON:-python}"
command -v "$py" >/dev/null || die "$py not found; activate the environment with megacpt before sbatch or set MEGACPT_PYTHON"

# ---- signals ----------------------------------------------------------------------------------
signalled=""
interrupted=0
step_pid=""
# shellcheck disable=SC2317  # invoked by the traps below
forward() {
    # srun forwards USR1 to every task; TERM it would turn into SIGKILL, so the ranks always get USR1.
    signalled="${signalled:-$1}"
    interrupted=1
    say "got SIG$1; asking the ranks to checkpoint and stop"
    if [[ -n "$step_pid" ]]; then
        kill -s USR1 "$step_pid" 2>/dev/null || true
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# ---- run state: run dir, total steps, last checkpointed step (config errors stop here) ----------
# The Python below is fixed text; the config path and overrides reach it only as arguments.
run_state() {
    "$py" - "$config" "${train_args[@]}" <<'PY'
import argparse, sys
from megacpt.errors import UserError
try:
    from megacpt.config import load_config
    from megacpt.train import checkpoint as ckpt
    from megacpt.train.phases import plan_phases
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args, _ = p.parse_known_args()
    cfg = load_config(args.config, args.overrides)
    phases = plan_phases(cfg)
    total = phases[-1].start + phases[-1].steps
    root = __import__("pathlib").Path(cfg.run_dir).resolve()
    if "\n" in str(root):
        raise UserError("run_dir must not contain a newline")
    latest = ckpt.latest_checkpoint(root / "checkpoints") if (root / "checkpoints").is_dir() else None
    done = int(ckpt.read_state(latest)["step"]) if latest is not None else 0
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
# Tagged lines: importing DeepSpeed may print its own notices on stdout.
print(f"megacpt-state: {root}")
print(f"megacpt-state: {total}")
print(f"megacpt-state: {done}")
PY
}
# run dir, total steps and the last checkpointed step, one per line (exit 2 on a config error)
read_state() {
    run_state | sed -n 's/^megacpt-state: //p'
}
state=$(read_state) || die "the config does not load (see above); nothing was started"
mapfile -t st <<<"$state"
run_dir="${st[0]}"
total_steps="${st[1]}"
done_steps="${st[2]}"
start_steps="$done_steps"

# ---- log into the run directory ---------------------------------------------------------------
log_dir="${MEGACPT_LOG_DIR-$run_dir/logs}"
if [[ -n "$log_dir" ]]; then
    mkdir -p -- "$log_dir" || die "cannot create log dir $log_dir"
    log_file="$log_dir/${SLURM_JOB_NAME:-megacpt}-${SLURM_JOB_ID}.out"
    say "log: $log_file"
    exec >>"$log_file" 2>&1
fi

# ---- time limit: USR1 to this shell MEGACPT_STOP_LEAD seconds before the job's end ----------------
lead="${MEGACPT_STOP_LEAD:-600}"
[[ "$lead" =~ ^[0-9]+$ ]] || die "MEGACPT_STOP_LEAD must be a whole number of seconds, got '$lead'"
timer_pid=""
end=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null | head -n 1)
if end_s=$(date -d "$end" +%s 2>/dev/null); then  # no end time (UNLIMITED): no timer
    left=$((end_s - $(date +%s)))
    if ((left <= lead + 60)); then
        die "the job has ${left}s left, at or under the ${lead}s stop lead + 60s, so it would stop at once and requeue in a loop; submit with a longer --time, or set MEGACPT_STOP_LEAD below $((left - 60 > 0 ? left - 60 : 0))"
    fi
    (sleep $((left - lead)) && kill -s USR1 $$) &
    timer_pid=$!
    say "stop lead ${lead}s: USR1 in $((left - lead))s"
fi
trap '[[ -n "$timer_pid" ]] && { pkill -P "$timer_pid" 2>/dev/null; kill "$timer_pid" 2>/dev/null; }' EXIT

# ---- rendezvous -------------------------------------------------------------------------------
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[[ ${#hosts[@]} -ge 1 ]] || die "scontrol show hostnames gave no host for $SLURM_JOB_NODELIST"
export MASTER_ADDR="${hosts[0]}"
# Same job id -> same port on every node; jobs sharing a node get different ports; a requeued job
# (same id) gets a new port, so a socket of its previous run still in TIME_WAIT cannot collide.
# 15000-29999 stays below Linux's ephemeral ports (32768-60999).
export MASTER_PORT="${MEGACPT_MASTER_PORT:-$((15000 + (SLURM_JOB_ID * 7 + ${SLURM_RESTART_COUNT:-0} * 131) % 15000))}"
# Since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch; SRUN_CPUS_PER_TASK does it.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}"
fi
export PYTHONUNBUFFERED=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"

say "---- $(date -u '+%Y-%m-%dT%H:%M:%SZ') start (restart ${SLURM_RESTART_COUNT:-0})"
say "config $config ${train_args[*]}"
say "run dir $run_dir, step $done_steps/$total_steps"
say "nodes ${SLURM_JOB_NUM_NODES:-${#hosts[@]}} (${hosts[*]}), tasks ${SLURM_NTASKS:-?} (per node ${SLURM_TASKS_PER_NODE:-?}), cpus/task ${SLURM_CPUS_PER_TASK:-default}, gpus/node ${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-none}}"
say "master $MASTER_ADDR:$MASTER_PORT, python $(command -v "$py")"
nccl_env=$(env | grep -E '^(NCCL_|TORCH_NCCL_|GLOO_|CUDA_VISIBLE_DEVICES=)' | sort | tr '\n' ' ')
[[ -n "$nccl_env" ]] && say "env $nccl_env"

run_step() {  # run_step NAME CMD...: an srun step in the background, waited for signal-safely
    local name="$1"
    shift
    srun --kill-on-bad-exit=1 "$@" &
    step_pid=$!
    local rc
    while :; do
        interrupted=0
        wait "$step_pid"
        rc=$?
        [[ $interrupted -eq 1 ]] || break  # a trap interrupted `wait`: the step still runs
    done
    step_pid=""
    say "$name step exited with $rc"
    return "$rc"
}

# ---- preflight, then training ------------------------------------------------------------------
rc=0
if [[ "$preflight" == 1 && -z "$signalled" ]]; then
    MASTER_PORT=$((MASTER_PORT + 1)) run_step preflight "$py" -m megacpt.preflight --timeout 300
    rc=$?
    if [[ $rc -ne 0 && -z "$signalled" ]]; then
        say "preflight failed; not training"
        exit "$rc"
    fi
fi
if [[ -z "$signalled" ]]; then
    run_step train "$py" -m megacpt.train "$config" "${train_args[@]}"
    rc=$?
fi

# ---- requeue after a USR1 stop of an unfinished run -----------------------------------------------
if [[ -n "$signalled" ]]; then
    if state=$(read_state); then
        mapfile -t st <<<"$state"
        done_steps="${st[2]}"
    fi
    say "stopped by SIG$signalled at step $done_steps/$total_steps (step exit code $rc)"
    # Requeue whatever the step's exit code (USR1 means "time is up", not "the run is broken"), but
    # only when this attempt moved the checkpoint forward: a job signalled before it gets anywhere
    # (--signal lead time >= --time, a signal during start-up) would otherwise requeue forever.
    if [[ "$signalled" == USR1 && "${MEGACPT_REQUEUE:-1}" == 1 && "$done_steps" -lt "$total_steps" ]]; then
      if [[ "$done_steps" -le "$start_steps" ]]; then
        say "no checkpoint progress in this attempt (step $start_steps -> $done_steps); not requeueing." \
            "Is the --signal lead time shorter than --time? Resubmit to resume."
      else
        say "requeueing job $SLURM_JOB_ID; it resumes from step $done_steps"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        say "scontrol requeue failed (is the job --requeue-able, JobRequeue=1?); resubmit to resume"
      fi
    fi
    if [[ "$done_steps" -lt "$total_steps" ]]; then
        # Not COMPLETED: an --dependency=afterok job (export, eval) must not start on an unfinished run.
        say "run unfinished at step $done_steps/$total_steps; resubmit the same command to resume"
        [[ "$signalled" == USR1 ]] && exit 138
        exit 143
    fi
fi
exit "$rc"

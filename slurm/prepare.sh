#!/bin/bash
# megacpt prepare as a Slurm array job: task I of N tokenizes the I-th contiguous 1/N of the input
# documents; a dependent job merges the N parts into exactly the bytes of one unsplit prepare.
#
# One command (submits both jobs and prints their ids; sbatch options, if any, before a `--`):
#   bash slurm/prepare.sh --submit 8 [--partition=cpu --time=2:00:00 --] --input data/raw --tokenizer HF_DIR --output data/de
# By hand, the same thing:
#   jid=$(sbatch --parsable --array=0-7 slurm/prepare.sh --input data/raw --tokenizer HF_DIR --output data/de)
#   sbatch --dependency=afterok:"$jid" slurm/prepare.sh --merge --input data/raw --tokenizer HF_DIR --output data/de
#
# Arguments are those of `megacpt prepare` (see `megacpt prepare --help`), passed through unchanged
# except --output: array task I writes PREFIX.parts/NNNNN (+ _valid with --valid-fraction); the
# merge job (--merge, same arguments; only --output is used) checks that all N parts are there and
# agree, merges them into PREFIX (and PREFIX_valid), then deletes the parts (--keep-parts keeps them).
# --num-shards/--shard-index come from the array (SLURM_ARRAY_TASK_COUNT, SLURM_ARRAY_TASK_ID);
# --workers defaults to the task's CPUs. Outside an array job it runs one unsplit prepare.
# sbatch options for both jobs can also come from the environment (SBATCH_PARTITION,
# SBATCH_TIMELIMIT, SBATCH_ACCOUNT, ...). MEGACPT_PYTHON picks the interpreter (default: python).
#
#SBATCH --job-name=megacpt-prepare
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=%x-%A_%a.out

set -uo pipefail

say() { printf 'prepare[%s]: %s\n' "${SLURM_JOB_ID:-local}" "$*"; }
die() { printf 'prepare[%s]: error: %s\n' "${SLURM_JOB_ID:-local}" "$*" >&2; exit 2; }

py="${MEGACPT_PYTHON:-python}"
mode=array
keep_parts=0
submit_n=""
case "${1:-}" in
    --merge) mode=merge; shift ;;
    --submit)
        mode=submit
        submit_n="${2:-}"
        [[ "$submit_n" =~ ^[1-9][0-9]*$ ]] || die "--submit needs a number of array tasks, e.g. --submit 8"
        shift 2 ;;
esac
# --submit N [SBATCH OPTIONS --] PREPARE ARGS: options before a `--` go to sbatch, for both jobs.
sbatch_opts=()
if [[ "$mode" == submit ]]; then
    for a in "$@"; do
        if [[ "$a" == -- ]]; then
            while [[ "$1" != -- ]]; do sbatch_opts+=("$1"); shift; done
            shift
            break
        fi
    done
fi

# Find --output (the only argument this script interprets) and drop the ones it sets itself.
out=""
args=()
have_workers=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --output) [[ $# -ge 2 ]] || die "--output needs a PREFIX"; out="$2"; shift 2 ;;
        --output=*) out="${1#--output=}"; shift ;;
        --keep-parts) keep_parts=1; shift ;;
        --num-shards|--shard-index|--num-shards=*|--shard-index=*)
            die "$1 is set from the Slurm array; choose the number of parts with sbatch --array=0-(N-1)" ;;
        --workers|--workers=*) have_workers=1; args+=("$1"); shift ;;
        *) args+=("$1"); shift ;;
    esac
done
[[ -n "$out" ]] || die "--output PREFIX is required"
parts="$out.parts"

if [[ "$mode" == submit ]]; then
    self="${BASH_SOURCE[0]}"
    keep=()
    [[ $keep_parts == 1 ]] && keep=(--keep-parts)
    array_id=$(sbatch --parsable --array="0-$((submit_n - 1))" "${sbatch_opts[@]}" "$self" "${args[@]}" --output "$out") \
        || die "sbatch of the array job failed"
    array_id="${array_id%%;*}"
    merge_id=$(sbatch --parsable --dependency="afterok:$array_id" --kill-on-invalid-dep=yes \
        --job-name=megacpt-merge --ntasks=1 --cpus-per-task=1 --output=%x-%j.out "${sbatch_opts[@]}" \
        "$self" --merge "${args[@]}" --output "$out" "${keep[@]}") || die "sbatch of the merge job failed"
    say "array job $array_id ($submit_n tasks), merge job ${merge_id%%;*} (after all tasks succeed) -> $out"
    echo "${array_id} ${merge_id%%;*}"
    exit 0
fi

if [[ "$mode" == merge ]]; then
    # Which parts exist, and do they belong together? The Python is fixed text; paths are arguments.
    listing=$("$py" - "$parts" <<'PY'
import json, sys
from pathlib import Path
parts = Path(sys.argv[1])
first = parts / "00000.json"
if not first.is_file():
    sys.exit(f"no {first}: did the array job run (and write into {parts})?")
n = json.loads(first.read_text())["num_shards"]
for i in range(n):
    sc = parts / f"{i:05d}.json"
    if not sc.is_file():
        sys.exit(f"part {i} of {n} is missing ({sc}); re-run that array task")
    meta = json.loads(sc.read_text())
    if (meta.get("num_shards"), meta.get("shard_index")) != (n, i):
        sys.exit(f"{sc} is part {meta.get('shard_index')} of {meta.get('num_shards')}, expected {i} of {n}: "
                 f"parts of two different runs; delete {parts} and re-run the array job")
    print(parts / f"{i:05d}")
PY
) || die "cannot merge: parts under $parts are incomplete (see above)"
    mapfile -t prefixes <<<"$listing"
    say "merging ${#prefixes[@]} parts into $out"
    "$py" -m megacpt.cli merge "${prefixes[@]}" --output "$out" || die "merge failed; the parts are kept"
    valid=()
    for p in "${prefixes[@]}"; do
        if [[ -e "${p}_valid.idx" || -e "${p}_valid_00000.idx" ]]; then valid+=("${p}_valid"); fi
    done
    if [[ ${#valid[@]} -gt 0 ]]; then
        [[ ${#valid[@]} -eq ${#prefixes[@]} ]] || die "only ${#valid[@]} of ${#prefixes[@]} parts have a _valid split"
        "$py" -m megacpt.cli merge "${valid[@]}" --output "${out}_valid" || die "merge of the _valid parts failed"
    fi
    if [[ $keep_parts == 0 ]]; then
        # Delete only what the array tasks wrote: NNNNN[_valid][_NNNNN].{bin,idx,json}.
        find "$parts" -maxdepth 1 -type f -regextype posix-extended \
            -regex '.*/[0-9]{5}(_valid)?(_[0-9]{5})?\.(bin|idx|json)' -delete
        rmdir -- "$parts" 2>/dev/null || say "kept $parts (it holds other files)"
    fi
    say "done: $out"
    exit 0
fi

if [[ $have_workers == 0 && -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    args+=(--workers "$SLURM_CPUS_PER_TASK")
fi
if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    say "not an array job: one unsplit prepare into $out"
    exec "$py" -m megacpt.cli prepare "${args[@]}" --output "$out"
fi

count="${SLURM_ARRAY_TASK_COUNT:?}"
first="${SLURM_ARRAY_TASK_MIN:-0}"
last="${SLURM_ARRAY_TASK_MAX:-$((count - 1))}"
# --array=0-7 (or 1-8): indexes must be contiguous, or a part would be missing.
[[ $((last - first + 1)) -eq $count ]] || die "array indexes $first..$last are not contiguous ($count tasks); use --array=0-(N-1)"
index=$((SLURM_ARRAY_TASK_ID - first))
mkdir -p -- "$parts" || die "cannot create $parts"
part="$parts/$(printf '%05d' "$index")"
say "part $index of $count -> $part"
exec "$py" -m megacpt.cli prepare "${args[@]}" --num-shards "$count" --shard-index "$index" --output "$part"

"""`megacpt bench train`: end-to-end training throughput, optionally side by side with peers.

What one invocation does
  1. Resolves --model (an HF dir, or a named shape from megacpt.bench.shapes built once with
     random weights), writes a synthetic token shard (random ids; uint16 below 65,500 ids, else
     int32) and a megacpt config into a work dir: eval off, no checkpoints (interval beyond the
     run, checkpoint.final off).
  2. For each round r = 1..--repeats it runs, one after the other, megacpt and (with --peers)
     peer a (transformers model + deepspeed.initialize, plain loop) and peer b (transformers
     Trainer + the same DeepSpeed JSON): A B C A B C ... Every run is a fresh
     `deepspeed --num_gpus N --master_port P --module ...` with the same environment (thread
     variables set explicitly), --warmup + --steps optimizer steps; the first --warmup steps of
     each run are excluded. Peers take the DeepSpeed JSON from the megacpt run's
     config.resolved.json and the token windows megacpt's data pipeline yields for the same steps.
  3. Reports per system: tokens/s (global batch tokens ÷ median step time of each round, then the
     median over rounds), per device, TFLOP/s per device and MFU (shared/CLI.md formula; MFU
     null without a known dense bf16 peak, e.g. on CPU), the step-time distribution of all timed
     steps (median, p10/p90, p25/p75, min/max), peak memory per rank, and megacpt's ratio to each
     peer (per round, from the same round's runs, then the median).

Peak memory per rank. CPU: resident-set high-water mark (VmHWM) per rank. For megacpt the bench
polls /proc/PID/status of each rank (identified by the launcher's `--local_rank=` argument)
every 0.2 s and stops once metrics.jsonl shows the second-to-last step (steps repeat the same
allocations; the last one is followed at once by the trainer's final checkpoint write, which is
not training memory); rank 0's own figure (ru_maxrss over all steps, from metrics.jsonl) is
reported next to it.
Peers report ru_maxrss themselves after their last step. CUDA: torch.cuda.max_memory_allocated;
the trainer logs rank 0's only, so other ranks of megacpt are null there.

Bytes communicated per step: an estimate, not a measurement (see comm_estimate()).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from megacpt.errors import UserError

SYSTEMS = ("megacpt", "hf-deepspeed", "hf-trainer")
PEER_OF = {"hf-deepspeed": "plain", "hf-trainer": "trainer"}
DESCRIPTION = {
    "megacpt": "megacpt trainer (python -m megacpt.train)",
    "hf-deepspeed": "peer a: transformers AutoModelForCausalLM + deepspeed.initialize, plain loop",
    "hf-trainer": "peer b: transformers Trainer, TrainingArguments(deepspeed=same JSON)",
}
REPO = Path(__file__).resolve().parents[2]


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="HF_DIR_OR_SHAPE",
                   help="a Hugging Face model dir or a shape name (tiny, small, smollm2-135m, smollm2-360m, "
                        "qwen2-0.5b, llama3-1b, llama3-3b, llama3-8b), built with random weights once")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per rank per optimizer step")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="steps run first and excluded from the figures")
    p.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--nproc", type=int, default=None, help="local ranks (default: GPUs, or 2 on CPU)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--peers", action="store_true", help="also run peer a (HF model + DeepSpeed loop) and "
                                                       "peer b (HF Trainer), interleaved")
    p.add_argument("--repeats", type=int, default=1, help="rounds of (megacpt[, peer a, peer b])")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS/MKL_NUM_THREADS for every rank of every system "
                        "(default: usable cores ÷ ranks, at least 1)")
    p.add_argument("--env", dest="extra_env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for every rank of every system (e.g. GLIBC_TUNABLES=... to give "
                        "the peers the allocator settings megacpt makes itself); recorded in the JSON")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra megacpt config override (e.g. deepspeed.zero_optimization.offload_optimizer.device=cpu, "
                        "model.activation_checkpointing=true); DeepSpeed keys reach the peers too")
    p.add_argument("--json", metavar="OUT.json", default=None, help="write the results here")
    p.add_argument("--work-dir", default=None, help="keep runs, logs and data here (default: a temp dir, removed)")
    p.add_argument("--cache-dir", default=None, help="where shapes are built (default $MEGACPT_CACHE/shapes "
                                                     "or ~/.cache/megacpt/shapes)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is killed")


# ----------------------------------------------------------------------------- helpers


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for an empty list."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def step_stats(times: list[float]) -> dict:
    return {
        "n": len(times),
        "median_s": percentile(times, 50),
        "p10_s": percentile(times, 10),
        "p90_s": percentile(times, 90),
        "p25_s": percentile(times, 25),
        "p75_s": percentile(times, 75),
        "min_s": min(times) if times else None,
        "max_s": max(times) if times else None,
        "mean_s": statistics.fmean(times) if times else None,
    }


def comm_estimate(stage: int, world: int, numels: list[int], bytes_per_elem: int, grad_accum: int,
                  persistence_threshold: int = 100_000, max_reuse_distance: int = 1_000_000_000) -> dict:
    """Estimated bytes each rank sends (≈ receives) per optimizer step, ring collectives.

    A ring all-gather or reduce-scatter of a tensor of B bytes moves B·(W-1)/W per rank; an
    all-reduce moves twice that. With P = total parameter elements, b = bytes per element (the
    model dtype, which DeepSpeed also communicates gradients in), g = micro-batches per step:
      stage 0 (DDP-like)  all-reduce of gradients once per step:            2·P·b·(W-1)/W
      stage 1             gradient all-reduce + all-gather of the updated
                          parameter partitions:                              3·P·b·(W-1)/W
      stage 2             reduce-scatter of gradients every micro-batch +
                          all-gather of updated parameters once:             (g+1)·P·b·(W-1)/W
      stage 3             per micro-batch: all-gather of the partitioned parameters (Pp) for the
                          forward, reduce-scatter of their gradients, and a second all-gather
                          for the backward of the fraction r that DeepSpeed released in between:
                          (2 + r)·g·Pp·b·(W-1)/W. DeepSpeed keeps a gathered parameter when its
                          next use is within stage3_max_reuse_distance elements (R, default 1e9);
                          a layer at depth x of the stack is next used ≈ 2·Pp·(1-x) elements later,
                          so r ≈ max(0, 1 - R/(2·Pp)) (0 for models below ~500M parameters at the
                          default). Parameters below stage3_param_persistence_threshold elements
                          (Pk, whole on every rank) only all-reduce their gradients: + 2·g·Pk·b·(W-1)/W
    Prefetch and bucketing change when bytes move, not how many; small collectives (the loss,
    token counts, the gradient norm) and the first step (whose trace is incomplete, so everything
    is re-gathered) are left out.
    """
    W, b, g = world, bytes_per_elem, grad_accum
    P = sum(numels)
    if W <= 1:
        return {"bytes_per_step": 0, "formula": "one rank: no communication", "estimate": True}
    f = (W - 1) / W
    if stage == 3:
        Pk = sum(n for n in numels if n < persistence_threshold)
        Pp = P - Pk
        r = max(0.0, 1.0 - max_reuse_distance / (2 * Pp)) if Pp else 0.0
        total = (2 + r) * g * Pp * b * f + 2 * g * Pk * b * f
        formula = (f"ZeRO-3: ((2 + r)·g·Pp + 2·g·Pk)·b·(W-1)/W with r={r:.2f} re-gathered for backward "
                   f"(stage3_max_reuse_distance {max_reuse_distance}), g={g}, Pp={Pp} partitioned, Pk={Pk} "
                   f"persistent (< {persistence_threshold} elements), b={b}, W={W}")
    elif stage == 2:
        total = (g + 1) * P * b * f
        formula = f"ZeRO-2: (g+1)·P·b·(W-1)/W with g={g}, P={P}, b={b}, W={W}"
    elif stage == 1:
        total = 3 * P * b * f
        formula = f"ZeRO-1: 3·P·b·(W-1)/W with P={P}, b={b}, W={W}"
    else:
        total = 2 * P * b * f
        formula = f"no ZeRO: 2·P·b·(W-1)/W with P={P}, b={b}, W={W}"
    return {"bytes_per_step": int(round(total)), "formula": formula, "estimate": True}


def stage_numels(margs, tp: int, pp: int, balance: str = "parameters") -> list[list[int]]:
    """Element counts of the parameters one rank of each pipeline stage holds (tp rank 0's
    slices; a tied embedding's head copy included on the last stage), as the trainer builds them."""
    from types import SimpleNamespace

    import torch

    from megacpt.models.llama import Transformer
    from megacpt.parallel.pp import stage_bounds
    from megacpt.parallel.tp import apply_tp

    with torch.device("meta"):
        m = Transformer(margs)
    apply_tp(m, SimpleNamespace(tp_size=tp, tp_rank=0, tp_group=None, tp_subgroup=lambda size: None))
    emb = m.embed_tokens.weight.numel()
    bounds = stage_bounds(margs, pp, balance) if pp > 1 else [0, margs.num_layers]
    out = []
    for s in range(pp):
        n = [p.numel() for i in range(bounds[s], bounds[s + 1]) for p in m.layers[i].parameters()]
        if s == 0:
            n.append(emb)
        if s == pp - 1:
            n.append(m.norm.weight.numel())
            if pp > 1 or not margs.tie_word_embeddings:
                n.append(emb)  # the head (a tied one is a copy on its own stage)
        out.append(n)
    return out


def comm_estimate_layout(margs, stage: int, dp: int, tp: int, pp: int, seq_len: int, micro_batch: int,
                         bytes_per_elem: int, grad_accum: int, persistence_threshold: int = 100_000,
                         max_reuse_distance: int = 1_000_000_000, balance: str = "parameters") -> dict:
    """Estimated bytes one rank sends per optimizer step, per process group, for dp × tp × pp.

    dp group: comm_estimate()'s ZeRO formula over W = dp on the parameters this rank holds
      (its stage, 1/tp of the split tensors).
    tp group (Megatron tensor parallelism, ring all-reduce of B bytes = 2·B·(tp-1)/tp per rank),
      per micro-batch with A = micro_batch·seq_len·hidden activation elements:
      4 all-reduces of A per decoder layer (forward after o_proj and down_proj, backward at the
      attention and MLP inputs) + 1 for the embedding output (first stage) + 1 for the head's
      input gradient (last stage), in the model dtype; the vocab-parallel loss adds 3 fp32 values
      per token (max, sum-exp, target logit) on the last stage; replicated KV heads (num_kv_heads
      < tp) all-reduce their k/v weight gradients over tp/num_kv_heads ranks every micro-batch.
    pp group (point-to-point, DeepSpeed's pipeline engine), per micro-batch: a stage that is not
      the last sends its output activations (A in the model dtype + position and segment ids,
      2·micro_batch·seq_len int64), one that is not the first sends the gradient of its input
      (A); with tied embeddings the first and last stage all-reduce the embedding gradient
      (2 ranks: V/tp·hidden elements) once per step.
    Reported per group as the busiest stage's figure; `bytes_per_step` is the busiest stage's
    total over all groups. Small collectives (loss, token count, norms) are left out.
    """
    g, b = grad_accum, bytes_per_elem
    h, L, V = margs.hidden_size, margs.num_layers, margs.vocab_size
    A = micro_batch * seq_len * h
    numels = stage_numels(margs, tp, pp, balance)
    from megacpt.parallel.pp import stage_bounds

    bounds = stage_bounds(margs, pp, balance) if pp > 1 else [0, L]
    ar = 2 * (tp - 1) / tp
    kv_rep = tp // margs.num_kv_heads if tp > 1 and margs.num_kv_heads < tp else 1
    kv_numel = margs.head_dim * (h + (1 if margs.qkv_bias else 0))
    per_stage = []
    for s in range(pp):
        layers = bounds[s + 1] - bounds[s]
        first, last = s == 0, s == pp - 1
        dp_c = comm_estimate(stage, dp, numels[s], b, g, persistence_threshold, max_reuse_distance)
        tp_bytes = 0.0
        if tp > 1:
            n_ar = 4 * layers + (1 if first else 0) + (1 if last else 0)
            tp_bytes = g * (n_ar * A * b * ar + (3 * micro_batch * seq_len * 4 * ar if last else 0))
            if kv_rep > 1:
                tp_bytes += g * layers * 2 * kv_numel * b * 2 * (kv_rep - 1) / kv_rep
        pp_bytes = 0.0
        if pp > 1:
            pp_bytes = g * ((0 if last else A * b + 2 * micro_batch * seq_len * 8) + (0 if first else A * b))
            if margs.tie_word_embeddings and (first or last):
                pp_bytes += (V // tp) * h * b  # all-reduce over 2 ranks: 2·B·½
        per_stage.append({"dp": dp_c["bytes_per_step"], "tp": int(round(tp_bytes)), "pp": int(round(pp_bytes)),
                          "dp_formula": dp_c["formula"]})
    busiest = max(per_stage, key=lambda r: r["dp"] + r["tp"] + r["pp"])
    groups = {
        "dp": {"size": dp, "bytes_per_step": max(r["dp"] for r in per_stage),
               "formula": "ZeRO over the data-parallel group on this rank's parameters: " + busiest["dp_formula"]},
        "tp": {"size": tp, "bytes_per_step": max(r["tp"] for r in per_stage),
               "formula": (f"g·((4·L_stage + first + last)·A·b + last·3·mb·s·4)·2(tp-1)/tp"
                           f"{' + g·L_stage·2·Pkv·b·2(r-1)/r' if kv_rep > 1 else ''} with g={g}, "
                           f"A=mb·s·h={A}, b={b}, tp={tp}" + (f", Pkv={kv_numel}, r={kv_rep}" if kv_rep > 1 else ""))},
        "pp": {"size": pp, "bytes_per_step": max(r["pp"] for r in per_stage),
               "formula": (f"g·((not last)·(A·b + 2·mb·s·8) + (not first)·A·b)"
                           f"{' + tied first/last: (V/tp)·h·b' if margs.tie_word_embeddings else ''} with g={g}, "
                           f"A={A}, b={b}, stages by layers {bounds}")},
    }
    return {"bytes_per_step": int(max(r["dp"] + r["tp"] + r["pp"] for r in per_stage)),
            "formula": "busiest rank, sum over its groups (see per_group)", "per_group": groups,
            "per_stage": [{k: r[k] for k in ("dp", "tp", "pp")} for r in per_stage], "estimate": True}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "deepspeed", "transformers", "accelerate", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["megacpt_commit"] = git_commit()
    return out


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) if head else None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher() -> str:
    cand = Path(sys.executable).parent / "deepspeed"
    if cand.exists():
        return str(cand)
    found = shutil.which("deepspeed")
    if not found:
        raise UserError("the deepspeed launcher is not on PATH; install deepspeed")
    return found


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_env(items: list[str]) -> dict:
    """--env NAME=VALUE items as a dict; names the launcher or the thread pinning owns are refused."""
    out = {}
    owned = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
             "MASTER_ADDR", "MASTER_PORT"}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UserError(f"--env {item!r}: expected NAME=VALUE")
        if name in owned:
            raise UserError(f"--env {name}: set by the bench itself (use --threads for thread counts)")
        out[name] = value
    return out


# The pinned variables bench_env sets that the JSON's "environment" records (--env items join them).
RECORDED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE")


def bench_env(threads: int) -> dict:
    """The environment every rank of every system gets (thread settings pinned explicitly)."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    return env


# ----------------------------------------------------------------------------- per-rank memory


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _rank_pids(root: int) -> dict[int, int]:
    """local rank -> pid, for descendants of `root` started with --local_rank=N."""
    kids = _children_map()
    out, stack = {}, list(kids.get(root, []))
    while stack:
        pid = stack.pop()
        stack.extend(kids.get(pid, []))
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for a in args:
            if a.startswith(b"--local_rank="):
                out[int(a.split(b"=", 1)[1])] = pid
    return out


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RankMonitor(threading.Thread):
    """Watches the ranks of one launch (descendants of the launcher with `--local_rank=N`).

    Every `interval` seconds: each rank's VmHWM (until `progress()` reaches `freeze_step`), and,
    whenever `progress()` (the last completed step) has advanced, the CPU seconds (utime+stime)
    all ranks have used so far: `cpu_marks` = [(step, cpu_s)], for CPU time per step.
    """

    def __init__(self, root_pid: int, expected: int, progress=None, freeze_step: int | None = None,
                 interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.expected, self.interval = root_pid, expected, interval
        self.progress = progress or (lambda: 0)
        self.freeze_step = freeze_step
        self.peaks: dict[int, float] = {}
        self.cpu_marks: list[tuple[int, float, float]] = []  # (step, CPU s of all ranks, monotonic time)
        self.stop = threading.Event()

    def run(self):
        if not os.path.isdir("/proc"):
            return
        pids: dict[int, int] = {}
        last = -1
        while not self.stop.is_set():
            step = self.progress()
            if len(pids) < self.expected:
                pids.update(_rank_pids(self.root))
            if self.freeze_step is None or step < self.freeze_step:
                for r, pid in pids.items():
                    v = _vm_hwm_mb(pid)
                    if v is not None:
                        self.peaks[r] = max(self.peaks.get(r, 0.0), v)
            if step > last and len(pids) >= self.expected:
                cpu = [_cpu_seconds(pid) for pid in pids.values()]
                if all(c is not None for c in cpu):
                    self.cpu_marks.append((step, sum(cpu), time.monotonic()))
                    last = step
            self.stop.wait(self.interval)


def cpu_per_step(marks: list, first: int, last: int, min_window_s: float = 10.0) -> float | None:
    """CPU seconds (all ranks) per step between the first marks at or after steps `first` and `last`.

    None when the window is shorter than `min_window_s` (the 0.2 s polling would dominate it).
    """
    a = next((m for m in marks if m[0] >= first), None)
    b = next((m for m in marks if m[0] >= last), None)
    if a is None or b is None or b[0] <= a[0] or b[2] - a[2] < min_window_s:
        return None
    return (b[1] - a[1]) / (b[0] - a[0])


# ----------------------------------------------------------------------------- runs


def run_launcher(cmd: list[str], env: dict, log_path: Path, timeout: float, expected: int = 1, progress=None,
                 freeze_step: int | None = None) -> tuple[int, float, "RankMonitor"]:
    """Run a launcher command; (exit code, wall seconds, the finished RankMonitor)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        mon = RankMonitor(proc.pid, expected, progress, freeze_step)
        mon.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            import signal

            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
        mon.stop.set()
        mon.join(timeout=5)
    remove_shm_buffers(cmd)
    return rc, time.perf_counter() - t0, mon


def remove_shm_buffers(cmd: list[str]) -> int:
    """Delete the /dev/shm segments DeepSpeed's CPU shared-memory all-reduce left behind.

    On CPU every rank of a local launch creates /dev/shm/deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK
    (~69 MB, tmpfs, i.e. RAM) and DeepSpeed 0.19 never unlinks it; each launch leaks nproc of them.
    Called once the launch (which used the master port in `cmd`) has ended.
    """
    import glob

    if "--master_port" not in cmd:
        return 0
    port = cmd[cmd.index("--master_port") + 1]
    n = 0
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        try:
            os.unlink(path)
            n += 1
        except OSError:
            pass
    return n


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _fail(what: str, rc: int, log: Path) -> None:
    tail = _tail(log)
    bad_input = "\nerror: " in "\n" + tail and rc != 124
    msg = f"{what} failed (exit {rc}{', timed out' if rc == 124 else ''}); log {log}:\n{tail}"
    if bad_input:
        raise UserError(msg)
    raise RuntimeError(msg)


def write_token_shard(prefix: Path, vocab: int, n_tokens: int, seed: int = 0) -> str:
    import numpy as np

    from megacpt.data.indexed import IndexedDatasetWriter

    dtype = np.uint16 if vocab < 65500 else np.int32
    rng = np.random.default_rng(seed)
    doc_len = 4096
    with IndexedDatasetWriter(str(prefix), dtype) as w:
        left = n_tokens
        while left > 0:
            n = min(doc_len, left)
            w.add_document(rng.integers(0, vocab, n, dtype=np.int64).astype(dtype))
            left -= n
    return np.dtype(dtype).name


def megacpt_config(run_dir: Path, hf_dir: Path, data_prefix: Path, a, G: int, total_steps: int, precision: str) -> dict:
    return {
        "run_dir": str(run_dir),
        "seed": 1234,
        "model": {"init_from": str(hf_dir)},
        "data": {"seq_len": a.seq_len, "train": [{"name": "synthetic", "path": str(data_prefix), "weight": 1.0}],
                 "valid": []},
        "train": {"steps": total_steps, "micro_batch_size": a.micro_batch, "global_batch_size": G,
                  "eval_interval": 10**9, "log_interval": 1, "eval_at_start": False},
        "schedule": {"kind": "constant", "warmup_steps": 0},
        "parallel": {"zero_stage": a.zero_stage, "tp": a.tp, "pp": a.pp},
        "precision": precision,
        "checkpoint": {"interval": 10**9, "keep": 1, "final": False},
        "tensorboard": False,
    }


def build_samples(path: Path, data_prefix: Path, seq_len: int, n: int, seed: int, vocab: int) -> None:
    """The token windows megacpt's pipeline gives samples 0..n-1 (same source name and seed as the run)."""
    import numpy as np

    from megacpt.data.dataset import BlendedDataset, Source

    ds = BlendedDataset([Source("synthetic", str(data_prefix), 1.0)], seq_len, seed, n, vocab_size=vocab)
    arr = np.stack([ds[i]["tokens"] for i in range(n)]).astype(np.int32 if vocab >= 65500 else np.uint16)
    np.save(path, arr)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "step_time_s" in rec:
            out.append(rec)
    return out


def progress_reader(path: Path, key: str = "step_time_s"):
    """A callable returning the last completed step logged in a JSON-lines file (lines with `key`)."""
    state = {"pos": 0, "step": 0, "partial": ""}

    def read() -> int:
        try:
            with open(path) as f:
                f.seek(state["pos"])
                chunk = f.read()
                state["pos"] = f.tell()
        except OSError:
            return state["step"]
        lines = (state["partial"] + chunk).split("\n")
        state["partial"] = lines.pop()  # an unfinished last line waits for the next read
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if key in rec and isinstance(rec.get("step"), int):
                state["step"] = max(state["step"], rec["step"])
        return state["step"]

    return read


# ----------------------------------------------------------------------------- main


def run_train_bench(a) -> int:
    import torch

    from megacpt.bench.shapes import resolve_model
    from megacpt.models.hf import args_from_hf_config, read_hf_config
    from megacpt.train.metrics import device_name, peak_flops

    for name in ("seq_len", "micro_batch", "grad_accum", "steps", "repeats", "tp", "pp"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if a.warmup < 0:
        raise UserError("--warmup must be ≥ 0")
    extra_env = parse_env(a.extra_env)
    cuda = torch.cuda.is_available()
    nproc = a.nproc or (torch.cuda.device_count() if cuda else 2)
    if nproc < 1:
        raise UserError("--nproc must be at least 1")
    if nproc % (a.tp * a.pp):
        raise UserError(f"--nproc {nproc} is not divisible by --tp × --pp = {a.tp * a.pp}")
    if a.peers and (a.tp > 1 or a.pp > 1):
        raise UserError("--peers compares data-parallel ZeRO runs; use --tp 1 --pp 1 with --peers")
    precision = a.precision if a.precision != "auto" else ("bf16" if cuda else "fp32")
    threads = a.threads or max(1, usable_cores() // nproc)
    hf_dir, shape = resolve_model(a.model, "bfloat16" if precision == "bf16" else "float32", a.cache_dir)
    base_cfg = read_hf_config(hf_dir)
    margs = args_from_hf_config(base_cfg, source=str(hf_dir / "config.json"))
    if a.seq_len > margs.max_position_embeddings:
        raise UserError(f"--seq-len {a.seq_len} exceeds the model's max_position_embeddings "
                        f"{margs.max_position_embeddings}")
    dp = nproc // (a.tp * a.pp)
    G = a.micro_batch * dp * a.grad_accum
    total_steps = a.warmup + a.steps
    tokens_per_step = G * a.seq_len
    flops_tok = margs.flops_per_token(a.seq_len)
    dev = device_name()
    peak = peak_flops(dev)

    keep = a.work_dir is not None
    work = Path(a.work_dir) if keep else Path(tempfile.mkdtemp(prefix="megacpt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = bench_env(threads)
    env.update(extra_env)
    ds_launcher = launcher()
    try:
        data_prefix = work / "data" / "synthetic"
        n_samples = (total_steps + 4) * G
        token_dtype = write_token_shard(data_prefix, margs.vocab_size, n_samples * (a.seq_len + 1) + a.seq_len)
        cfg = megacpt_config(work / "runs" / "megacpt", hf_dir, data_prefix, a, G, total_steps, precision)
        import yaml

        load_before = os.getloadavg()
        wall_start = time.time()
        systems = ["megacpt"] + (["hf-deepspeed", "hf-trainer"] if a.peers else [])
        runs: list[dict] = []
        resolved = None
        spec_path = work / "peer_spec.json"
        print(f"bench train: {a.model} ({margs.num_params() / 1e6:.1f}M params), seq {a.seq_len}, micro-batch "
              f"{a.micro_batch}, grad-accum {a.grad_accum}, {nproc} ranks, ZeRO-{a.zero_stage}, {precision}, "
              f"{threads} threads/rank; {a.warmup} warm-up + {a.steps} timed steps; systems {', '.join(systems)}; "
              f"{a.repeats} round(s); work dir {work}", flush=True)
        for rnd in range(1, a.repeats + 1):
            for system in systems:
                tag = f"{system}-r{rnd}"
                log = work / "logs" / f"{tag}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                port = free_port()
                if system == "megacpt":
                    run_dir = work / "runs" / tag
                    shutil.rmtree(run_dir, ignore_errors=True)
                    cfg["run_dir"] = str(run_dir)
                    cfg_path = work / f"{tag}.yaml"
                    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
                    cmd = [ds_launcher, "--num_gpus", str(nproc), "--master_port", str(port), "--module",
                           "megacpt.train", str(cfg_path)]
                    for s in a.overrides:
                        cmd += ["--set", s]
                    progress = progress_reader(run_dir / "metrics.jsonl")
                    # Memory: stop counting at the second-to-last step; the last one is followed at
                    # once by the trainer's final checkpoint write, which a 0.2 s poll could catch.
                    freeze = max(total_steps - 1, 1)
                else:
                    out_dir = work / "runs" / tag
                    shutil.rmtree(out_dir, ignore_errors=True)
                    spec = json.loads(spec_path.read_text())
                    spec["out"] = str(out_dir)
                    rspec = work / f"{tag}.json"
                    rspec.write_text(json.dumps(spec, indent=1))
                    cmd = [ds_launcher, "--num_gpus", str(nproc), "--master_port", str(port), "--module",
                           "megacpt.bench.peers", PEER_OF[system], str(rspec)]
                    progress = progress_reader(out_dir / "progress.jsonl", key="step_time_s")
                    freeze = None
                print(f"[round {rnd}/{a.repeats}] {system}: {' '.join(cmd)}", flush=True)
                la0 = os.getloadavg()
                rc, wall, mon = run_launcher(cmd, env, log, a.timeout, nproc, progress, freeze)
                polled = mon.peaks
                if rc != 0:
                    _fail(f"{system} (round {rnd})", rc, log)
                rec = {"system": system, "round": rnd, "command": cmd, "wall_s": wall, "exit_code": rc,
                       "loadavg_before": la0, "loadavg_after": os.getloadavg()}
                if system == "megacpt":
                    metrics = read_metrics(run_dir)
                    if len(metrics) < total_steps:
                        raise RuntimeError(f"megacpt wrote {len(metrics)} of {total_steps} steps; log {log}")
                    times = [m["step_time_s"] for m in metrics[:total_steps]]
                    per_rank = [m.get("peak_memory_mb_per_rank") for m in metrics[:total_steps]]
                    if cuda and all(isinstance(p, list) and len(p) == nproc for p in per_rank):
                        # a trainer that logs every rank's peak (all-gathered)
                        rec["peak_memory_mb_per_rank"] = [max(p[k] for p in per_rank) for k in range(nproc)]
                    elif cuda:
                        rec["peak_memory_mb_per_rank"] = [max(m["peak_memory_mb"] for m in metrics)] + [None] * (nproc - 1)
                    else:
                        rec["peak_memory_mb_per_rank"] = [polled.get(r) for r in range(nproc)]
                    rec["rank0_peak_memory_mb_from_metrics"] = max(m["peak_memory_mb"] for m in metrics)
                    rec["losses"] = [m["loss"] for m in metrics[:total_steps]]
                    if resolved is None:
                        resolved = json.loads((run_dir / "config.resolved.json").read_text())
                        _write_peer_spec(spec_path, work, resolved, hf_dir, a, G, total_steps, n_samples,
                                         precision, data_prefix, margs.vocab_size, cfg["seed"], a.peers)
                else:
                    ranks = []
                    for r in range(nproc):
                        p = Path(spec["out"]) / f"rank{r}.json"
                        if not p.exists():
                            raise RuntimeError(f"{system} (round {rnd}) wrote no {p.name}; log {log}")
                        ranks.append(json.loads(p.read_text()))
                    times = ranks[0]["step_times_s"]
                    if len(times) < total_steps:
                        raise RuntimeError(f"{system} timed {len(times)} of {total_steps} steps; log {log}")
                    times = times[:total_steps]
                    rec["peak_memory_mb_per_rank"] = [r["peak_memory_mb"] for r in ranks]
                    rec["polled_peak_rss_mb_per_rank"] = [polled.get(r) for r in range(nproc)] if not cuda else None
                    rec["losses"] = ranks[0]["losses"]
                rec["step_times_s"] = times
                rec["timed_step_times_s"] = times[a.warmup:]
                med = percentile(rec["timed_step_times_s"], 50)
                rec["tokens_per_s"] = tokens_per_step / med
                rec["cpu_marks"] = mon.cpu_marks
                cps = None if cuda else cpu_per_step(mon.cpu_marks, max(a.warmup, 1), total_steps)
                rec["cpu_s_per_step"] = cps
                rec["tokens_per_cpu_s"] = tokens_per_step / cps if cps else None
                runs.append(rec)
                print(f"[round {rnd}/{a.repeats}] {system}: median {med:.3f} s/step over {a.steps} timed steps "
                      f"= {rec['tokens_per_s']:.1f} tokens/s (run wall {wall:.0f} s)", flush=True)
        load_after = os.getloadavg()

        numels = _param_numels(margs)
        ds_json = resolved["deepspeed"]
        zcfg = ds_json.get("zero_optimization", {})
        comm = comm_estimate(a.zero_stage, dp, numels, 2 if precision == "bf16" else 4, a.grad_accum,
                             int(zcfg.get("stage3_param_persistence_threshold", 100_000)),
                             int(zcfg.get("stage3_max_reuse_distance", 1_000_000_000)))
        if a.tp > 1 or a.pp > 1:
            comm = comm_estimate_layout(margs, a.zero_stage, dp, a.tp, a.pp, a.seq_len, a.micro_batch,
                                        2 if precision == "bf16" else 4, a.grad_accum,
                                        int(zcfg.get("stage3_param_persistence_threshold", 100_000)),
                                        int(zcfg.get("stage3_max_reuse_distance", 1_000_000_000)))
        results = {}
        for system in systems:
            mine = [r for r in runs if r["system"] == system]
            per_round = [r["tokens_per_s"] for r in mine]
            tps = statistics.median(per_round)
            per_dev = tps / nproc
            tflops = flops_tok * per_dev / 1e12
            mem = [max((r["peak_memory_mb_per_rank"][k] for r in mine if r["peak_memory_mb_per_rank"][k] is not None),
                       default=None) for k in range(nproc)]
            results[system] = {
                "description": DESCRIPTION[system],
                "tokens_per_s": tps,
                "tokens_per_s_per_device": per_dev,
                "tflops_per_device": tflops,
                "mfu": tflops * 1e12 / peak if peak else None,
                "tokens_per_s_per_round": per_round,
                "step_time": step_stats([t for r in mine for t in r["timed_step_times_s"]]),
                "peak_memory_mb_per_rank": mem,
                "cpu_s_per_step": _median_or_none([r["cpu_s_per_step"] for r in mine]),
                "tokens_per_cpu_s": _median_or_none([r["tokens_per_cpu_s"] for r in mine]),
            }
        ratios = {}
        for peer in systems[1:]:
            per_round, cpu_round = [], []
            for rnd in range(1, a.repeats + 1):
                m = next(r for r in runs if r["system"] == "megacpt" and r["round"] == rnd)
                p = next(r for r in runs if r["system"] == peer and r["round"] == rnd)
                per_round.append(m["tokens_per_s"] / p["tokens_per_s"])
                if m["tokens_per_cpu_s"] and p["tokens_per_cpu_s"]:
                    cpu_round.append(m["tokens_per_cpu_s"] / p["tokens_per_cpu_s"])
            ratios[peer] = {"median": statistics.median(per_round), "per_round": per_round,
                            "cpu_time_median": _median_or_none(cpu_round), "cpu_time_per_round": cpu_round}
        out = {
            "benchmark": "train",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(wall_start)),
            "device": dev,
            "cuda": cuda,
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "usable_cores": usable_cores(),
            "dense_bf16_peak_flops": peak,
            "versions": versions(),
            "command": "megacpt bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
            "argv": sys.argv,
            "model": {"arg": a.model, "shape": shape, "hf_dir": str(hf_dir), "params": margs.num_params(),
                      "non_embedding_params": margs.num_params(embedding=False), "args": margs.to_dict()},
            "setup": {"seq_len": a.seq_len, "micro_batch": a.micro_batch, "grad_accum": a.grad_accum,
                      "nproc": nproc, "dp": dp, "tp": a.tp, "pp": a.pp, "zero_stage": a.zero_stage,
                      "precision": precision, "global_batch": G, "tokens_per_step": tokens_per_step,
                      "warmup_steps": a.warmup, "timed_steps": a.steps, "repeats": a.repeats,
                      "threads_per_rank": threads, "token_dtype": token_dtype, "overrides": a.overrides},
            "environment": {**{k: env[k] for k in RECORDED_ENV}, **extra_env},
            # megacpt's own CPU allocator setting (train.cpu_allocator); the peers run malloc as configured
            # by the environment above.
            "megacpt_caching_malloc": resolved.get("caching_malloc"),
            "flops_per_token": flops_tok,
            "mfu_formula": "(6 × non-embedding params + 12 × layers × hidden × seq_len) × tokens/s per device "
                           "÷ dense bf16 peak (null where no peak is known, e.g. CPU)",
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "megacpt_config": resolved["config"],
            "deepspeed_config": ds_json,
            "comm_per_step": comm,
            "results": results,
            "ratios": ratios,
            "runs": runs,
            "order": [f"{r['system']}-r{r['round']}" for r in runs],
            "notes": [
                "tokens/s = global batch tokens ÷ median timed step time, per round; the median over rounds",
                "ratios: megacpt tokens/s ÷ the peer's in the same round, median over rounds",
                "peak memory: CPU VmHWM per rank (megacpt polled until its last step; peers' ru_maxrss); CUDA "
                "max_memory_allocated (megacpt: rank 0 only)",
                "comm_per_step is an estimate from the ZeRO stage, world size and parameter sizes",
                "cpu_s_per_step (CPU only): utime+stime of all ranks per timed step, sampled from /proc when each "
                "step is logged (0.2 s polling); unlike wall time it does not grow when other processes take "
                "turns on the cores, so tokens_per_cpu_s and ratios.*.cpu_time_median are the figures to read "
                "on a shared machine",
            ],
        }
        print(format_table(out), flush=True)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
            print(f"wrote {a.json}", flush=True)
        return 0
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _write_peer_spec(spec_path: Path, work: Path, resolved: dict, hf_dir: Path, a, G: int, total_steps: int,
                     n_samples: int, precision: str, data_prefix: Path, vocab: int, seed: int, peers: bool) -> None:
    if not peers:
        return
    samples = work / "data" / "samples.npy"
    build_samples(samples, data_prefix, a.seq_len, n_samples, seed, vocab)
    o = resolved["config"]["optim"]
    spec = {
        "hf_dir": str(hf_dir),
        "ds_config": resolved["deepspeed"],
        "samples": str(samples),
        "steps": total_steps,
        "seq_len": a.seq_len,
        "micro_batch": a.micro_batch,
        "grad_accum": a.grad_accum,
        "global_batch": G,
        "precision": precision,
        "seed": seed,
        "activation_checkpointing": bool(resolved["config"]["model"].get("activation_checkpointing")),
        "optim": {"lr": o["lr"], "betas": [o["beta1"], o["beta2"]], "eps": o["eps"],
                  "weight_decay": o["weight_decay"], "grad_clip": o["grad_clip"]},
    }
    spec_path.write_text(json.dumps(spec, indent=1))


def _param_numels(margs) -> list[int]:
    import torch

    from megacpt.models.llama import Transformer

    with torch.device("meta"):
        m = Transformer(margs)
    return [p.numel() for p in m.parameters()]


def _median_or_none(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def format_table(out: dict) -> str:
    s = out["setup"]
    lines = [
        "",
        f"{out['model']['arg']} · seq {s['seq_len']} · micro-batch {s['micro_batch']} · grad-accum {s['grad_accum']} · "
        f"{s['nproc']} ranks · ZeRO-{s['zero_stage']} · {s['precision']} · {s['threads_per_rank']} threads/rank · "
        f"{out['device']}",
        f"{'system':<14} {'tokens/s':>10} {'tok/s/dev':>10} {'TFLOP/s/dev':>11} {'MFU':>6} "
        f"{'step s (p10–p90)':>22} {'CPU-s/step':>10} {'peak MB/rank':>14} {'megacpt ×':>10} {'× (CPU-s)':>10}",
    ]
    for name, r in out["results"].items():
        st = r["step_time"]
        mem = "/".join(_fmt(m, ".0f") for m in r["peak_memory_mb_per_rank"])
        ratio = out["ratios"].get(name, {}).get("median")
        cratio = out["ratios"].get(name, {}).get("cpu_time_median")
        lines.append(
            f"{name:<14} {r['tokens_per_s']:>10.1f} {r['tokens_per_s_per_device']:>10.1f} "
            f"{r['tflops_per_device']:>11.4f} {_fmt(r['mfu'], '.1%'):>6} "
            f"{st['median_s']:>8.3f} ({st['p10_s']:.3f}–{st['p90_s']:.3f}) {_fmt(r['cpu_s_per_step'], '.2f'):>10} "
            f"{mem:>14} {_fmt(ratio, '.2f'):>10} {_fmt(cratio, '.2f'):>10}")
    c = out["comm_per_step"]
    lines.append(f"communication per step (estimate): {c['bytes_per_step'] / 2**20:.1f} MiB per rank — {c['formula']}")
    for name, grp in c.get("per_group", {}).items():
        lines.append(f"  {name} group ({grp['size']} ranks): {grp['bytes_per_step'] / 2**20:.2f} MiB — {grp['formula']}")
    extra = {k: v for k, v in out["environment"].items() if k not in RECORDED_ENV}
    if extra:
        lines.append("extra environment (every system): " + " ".join(f"{k}={v}" for k, v in extra.items()))
    if out.get("megacpt_caching_malloc") is not None:
        lines.append(f"megacpt's caching malloc (train.cpu_allocator): {'on' if out['megacpt_caching_malloc'] else 'off'}")
    lines.append(f"load average before/after: {out['loadavg_before'][0]:.2f} / {out['loadavg_after'][0]:.2f}")
    return "\n".join(lines)

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

Bytes communicated per step: an estimate, not a measurement (megacpt.bench.comm).

Modules: plan (set-up: checks, model, work dir, data, configs, peer spec), launch (the launcher,
the environment, the per-rank monitor), rounds (the interleaved runs), report (figures, JSON,
table), comm (the communication estimate).
"""

from __future__ import annotations

import os
import shutil
import time

from megacpt.bench.plan import plan_train_bench, prepare_data
from megacpt.bench.report import format_table, train_report, write_json
from megacpt.bench.rounds import run_rounds


def run_train_bench(a) -> int:
    """`megacpt bench train` (a: its parsed arguments)."""
    b = plan_train_bench(a)
    try:
        prepare_data(b)
        load_before = os.getloadavg()
        wall_start = time.time()
        print(f"bench train: {a.model} ({b.margs.num_params() / 1e6:.1f}M params), seq {a.seq_len}, micro-batch "
              f"{a.micro_batch}, grad-accum {a.grad_accum}, {b.nproc} ranks, ZeRO-{a.zero_stage}, {b.precision}, "
              f"{b.threads} threads/rank; {a.warmup} warm-up + {a.steps} timed steps; systems {', '.join(b.systems)}; "
              f"{a.repeats} round(s); work dir {b.work}", flush=True)
        runs, resolved = run_rounds(b)
        out = train_report(b, runs, resolved, (load_before, os.getloadavg()), wall_start)
        print(format_table(out), flush=True)
        if a.json:
            write_json(a.json, out)
        return 0
    finally:
        if not b.keep:
            shutil.rmtree(b.work, ignore_errors=True)

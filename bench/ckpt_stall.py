"""Training stall per checkpoint save, synchronous against asynchronous (checkpoint.async).

    OMP_NUM_THREADS=1 timeout 3000 .venv/bin/python bench/ckpt_stall.py --model smollm2-135m \
        --json bench/results/ckpt-stall-cpu-DATE.json

Each round runs the trainer (`python -m megacpt.train`, one process, ZeRO-0, fp32) twice on the
same random-init model (a shape from megacpt/bench/shapes.py, or an HF dir) and random tokens,
once with checkpoint.async false and once true (the order alternates between rounds), saving every
--interval steps (keep 1, no final save). The stall of a save is the wall time the training loop
spent in the save call: `blocked_s` of the trainer's `checkpoint` events in metrics.jsonl.
Synchronous, that is DeepSpeed's torch.save of every file, the RNG state, the metadata, the
manifest's BLAKE2b pass over the bytes and the rename; asynchronous, the wait for the previous
save if it is still in flight, and the snapshot of the files into host memory. Also reported: the
step right after each save (the async writer runs beside it) against the other steps, the run's
wall time from launch to exit (the async run finishes its last save before it exits), the peak
resident memory (`peak_memory_mb`: the async snapshot is a second copy of the checkpoint's bytes)
and the checkpoint's size on disk. An untimed one-step run comes first (the first launch on fresh
data pays for one-off work, a minute and more here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from megacpt.bench.shapes import resolve_model
from megacpt.data.indexed import IndexedDatasetWriter

REPO = Path(__file__).resolve().parents[1]


def make_data(prefix: Path, vocab: int, tokens: int) -> str:
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(str(prefix), np.uint16 if vocab < 65535 else np.int32) as w:
        for _ in range(tokens // 512 + 1):
            w.add_document(rng.integers(0, vocab - 1, 512))
    return str(prefix)


def run_config(args, model_dir: Path, data: str, run_dir: Path, is_async: bool, steps: int) -> dict:
    return {
        "run_dir": str(run_dir),
        "seed": 1,
        "model": {"init_from": str(model_dir)},
        "data": {"seq_len": args.seq_len, "train": [{"name": "random", "path": data, "weight": 1.0}]},
        "train": {"steps": steps, "micro_batch_size": 1, "global_batch_size": 1,
                  "log_interval": 1},
        "optim": {"lr": 1e-4},
        "schedule": {"kind": "constant", "warmup_steps": 0},
        "parallel": {"zero_stage": 0},
        "precision": "fp32",
        "checkpoint": {"interval": args.interval, "keep": 1, "final": False, "async": is_async},
        "tensorboard": False,
    }


def one_run(args, model_dir: Path, data: str, work: Path, label: str, is_async: bool, steps: int = 0) -> dict | None:
    """One training run; its measurements (None for a run without checkpoints)."""
    run_dir = work / label
    cfg = work / f"{label}.yaml"
    steps = steps or args.interval * args.saves + 1
    cfg.write_text(yaml.safe_dump(run_config(args, model_dir, data, run_dir, is_async, steps)))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(work / f"{label}.log", "w") as log:
        r = subprocess.run([sys.executable, "-m", "megacpt.train", str(cfg)], cwd=REPO, env=env, stdout=log,
                           stderr=subprocess.STDOUT, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:  # the work dir goes with the exit: its log's end, here
        tail = "\n".join((work / f"{label}.log").read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"{label} failed (exit {r.returncode}):\n{tail}")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    saves = [r for r in recs if r.get("event") == "checkpoint"]
    if not saves:
        return None
    steps = {r["step"]: r["step_time_s"] for r in recs if "step_time_s" in r}
    after = {s["step"] + 1 for s in saves}
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    size = sum(f.stat().st_size for f in latest.rglob("*") if f.is_file())
    return {
        "label": label, "async": is_async, "wall_s": wall,
        "blocked_s": [s["blocked_s"] for s in saves],
        "step_after_save_s": [t for s, t in steps.items() if s in after],
        "step_other_s": [t for s, t in steps.items() if s not in after and s > 1],  # step 1 warms up
        "peak_memory_mb": max(r.get("peak_memory_mb") or 0 for r in recs),
        "checkpoint_bytes": size,
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summary(runs: list[dict]) -> dict:
    def med(key):
        vals = [v for r in runs for v in r[key]]
        return statistics.median(vals) if vals else None

    return {"saves": sum(len(r["blocked_s"]) for r in runs), "blocked_s_median": med("blocked_s"),
            "blocked_s_max": max(v for r in runs for v in r["blocked_s"]),
            "step_after_save_s_median": med("step_after_save_s"), "step_other_s_median": med("step_other_s"),
            "wall_s_median": statistics.median(r["wall_s"] for r in runs),
            "peak_memory_mb_max": max(r["peak_memory_mb"] for r in runs),
            "checkpoint_bytes": runs[0]["checkpoint_bytes"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="shape name or HF dir (default smollm2-135m)")
    p.add_argument("--saves", type=int, default=4, help="checkpoints per run (default 4)")
    p.add_argument("--interval", type=int, default=3, help="steps between checkpoints (default 3)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="sync/async pairs, order alternating (default 2)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the trainer (default 1)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--work-dir", default=None, help="keep runs here (default: a temp dir, removed)")
    p.add_argument("--json", default=None, metavar="OUT.json")
    args = p.parse_args(argv)
    model_dir, shape = resolve_model(args.model)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        data = make_data(work / "random", vocab, 4 * (args.interval * args.saves + 1) * (args.seq_len + 1))
        # Untimed: the first launch on fresh data pays for one-off work (the data's sample index,
        # caches) that would otherwise count against whichever mode ran first.
        one_run(args, model_dir, data, work, "warmup", False, steps=1)
        runs = []
        for i in range(args.rounds):
            for is_async in ((False, True) if i % 2 == 0 else (True, False)):
                label = f"r{i}-{'async' if is_async else 'sync'}"
                runs.append(one_run(args, model_dir, data, work, label, is_async))
                print(f"{label}: blocked {', '.join(f'{b:.3f}' for b in runs[-1]['blocked_s'])} s per save; "
                      f"wall {runs[-1]['wall_s']:.1f} s", flush=True)
                shutil.rmtree(work / label / "checkpoints")  # disk: one run's checkpoints at a time
    out = {"model": shape or str(model_dir), "params_note": "fp32, ZeRO-0, one process", "seq_len": args.seq_len,
           "interval": args.interval, "saves_per_run": args.saves, "threads": args.threads,
           "host": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "load_avg_at_end": os.getloadavg()},
           "runs": runs,
           "sync": summary([r for r in runs if not r["async"]]),
           "async": summary([r for r in runs if r["async"]])}
    print(f"\n{'':6} {'saves':>5} {'stall/save median (max) s':>27} {'step after save s':>18} {'other steps s':>14} "
          f"{'run wall s':>11} {'peak RSS MB':>12}")
    for k in ("sync", "async"):
        s = out[k]
        print(f"{k:6} {s['saves']:>5} {s['blocked_s_median']:>19.3f} ({s['blocked_s_max']:.3f}) "
              f"{s['step_after_save_s_median']:>18.3f} {s['step_other_s_median']:>14.3f} {s['wall_s_median']:>11.1f} "
              f"{s['peak_memory_mb_max']:>12.0f}")
    print(f"checkpoint: {out['sync']['checkpoint_bytes'] / 2**20:.0f} MiB on disk")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

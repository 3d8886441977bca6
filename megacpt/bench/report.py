"""What `megacpt bench train` reports: per-system figures over the rounds, megacpt's ratio to
each peer, the JSON document (`--json`) with the machine, versions and configs it ran under, and
the table printed at the end. `versions()` is shared with `megacpt bench memory`."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from megacpt.bench.comm import CommSetup, comm_estimate_run
from megacpt.bench.host import cpu_model
from megacpt.bench.launch import RECORDED_ENV, REPO, usable_cores
from megacpt.bench.plan import TrainBench

DESCRIPTION = {
    "megacpt": "megacpt trainer (python -m megacpt.train)",
    "hf-deepspeed": "peer a: transformers AutoModelForCausalLM + deepspeed.initialize, plain loop",
    "hf-trainer": "peer b: transformers Trainer, TrainingArguments(deepspeed=same JSON)",
}
NOTES = [
    "tokens/s = global batch tokens ÷ median timed step time, per round; the median over rounds",
    "ratios: megacpt tokens/s ÷ the peer's in the same round, median over rounds",
    "peak memory: CPU VmHWM per rank (megacpt polled until its last step; peers' ru_maxrss); CUDA "
    "max_memory_allocated (megacpt: rank 0 only)",
    "comm_per_step is an estimate from the ZeRO stage, world size and parameter sizes",
    "cpu_s_per_step (CPU only): utime+stime of all ranks per timed step, sampled from /proc when each "
    "step is logged (0.2 s polling); unlike wall time it does not grow when other processes take "
    "turns on the cores, so tokens_per_cpu_s and ratios.*.cpu_time_median are the figures to read "
    "on a shared machine",
]


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


def _median_or_none(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def versions() -> dict:
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


def bench_command() -> str:
    """The command line as the user typed it (`megacpt bench ...`)."""
    return "megacpt bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])


def write_json(path: str, out: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}", flush=True)


def system_results(b: TrainBench, runs: list[dict]) -> dict:
    """Per system: tokens/s (median over rounds), per device, TFLOP/s, MFU, step-time spread,
    peak memory per rank (the highest over rounds), CPU time per step."""
    results = {}
    for system in b.systems:
        mine = [r for r in runs if r["system"] == system]
        per_round = [r["tokens_per_s"] for r in mine]
        tps = statistics.median(per_round)
        per_dev = tps / b.nproc
        tflops = b.flops_per_token * per_dev / 1e12
        mem = [max((r["peak_memory_mb_per_rank"][k] for r in mine if r["peak_memory_mb_per_rank"][k] is not None),
                   default=None) for k in range(b.nproc)]
        results[system] = {
            "description": DESCRIPTION[system],
            "tokens_per_s": tps,
            "tokens_per_s_per_device": per_dev,
            "tflops_per_device": tflops,
            "mfu": tflops * 1e12 / b.peak if b.peak else None,
            "tokens_per_s_per_round": per_round,
            "step_time": step_stats([t for r in mine for t in r["timed_step_times_s"]]),
            "peak_memory_mb_per_rank": mem,
            "cpu_s_per_step": _median_or_none([r["cpu_s_per_step"] for r in mine]),
            "tokens_per_cpu_s": _median_or_none([r["tokens_per_cpu_s"] for r in mine]),
        }
    return results


def peer_ratios(b: TrainBench, runs: list[dict]) -> dict:
    """megacpt ÷ each peer, per round from the same round's runs, and the median over rounds."""
    ratios = {}
    for peer in b.systems[1:]:
        per_round, cpu_round = [], []
        for rnd in range(1, b.a.repeats + 1):
            m = next(r for r in runs if r["system"] == "megacpt" and r["round"] == rnd)
            p = next(r for r in runs if r["system"] == peer and r["round"] == rnd)
            per_round.append(m["tokens_per_s"] / p["tokens_per_s"])
            if m["tokens_per_cpu_s"] and p["tokens_per_cpu_s"]:
                cpu_round.append(m["tokens_per_cpu_s"] / p["tokens_per_cpu_s"])
        ratios[peer] = {"median": statistics.median(per_round), "per_round": per_round,
                        "cpu_time_median": _median_or_none(cpu_round), "cpu_time_per_round": cpu_round}
    return ratios


def comm_for(b: TrainBench, ds_json: dict) -> dict:
    """The communication estimate for this run's layout and DeepSpeed's ZeRO-3 knobs."""
    a, zcfg = b.a, ds_json.get("zero_optimization", {})
    return comm_estimate_run(b.margs, CommSetup(
        zero_stage=a.zero_stage, dp=b.dp, tp=a.tp, pp=a.pp, seq_len=a.seq_len, micro_batch=a.micro_batch,
        grad_accum=a.grad_accum, bytes_per_elem=4 if b.precision == "fp32" else 2,
        persistence_threshold=int(zcfg.get("stage3_param_persistence_threshold", 100_000)),
        max_reuse_distance=int(zcfg.get("stage3_max_reuse_distance", 1_000_000_000))))


def _machine(b: TrainBench, wall_start: float) -> dict:
    return {
        "benchmark": "train",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(wall_start)),
        "device": b.device,
        "cuda": b.cuda,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "dense_bf16_peak_flops": b.peak,
        "versions": versions(),
        "command": bench_command(),
        "argv": sys.argv,
    }


def _setup(b: TrainBench) -> dict:
    a, m = b.a, b.margs
    return {
        "model": {"arg": a.model, "shape": b.shape, "hf_dir": str(b.hf_dir), "params": m.num_params(),
                  "non_embedding_params": m.num_params(embedding=False), "args": m.to_dict()},
        "setup": {"seq_len": a.seq_len, "micro_batch": a.micro_batch, "grad_accum": a.grad_accum,
                  "nproc": b.nproc, "dp": b.dp, "tp": a.tp, "pp": a.pp, "zero_stage": a.zero_stage,
                  "precision": b.precision, "global_batch": b.global_batch, "tokens_per_step": b.tokens_per_step,
                  "warmup_steps": a.warmup, "timed_steps": a.steps, "repeats": a.repeats,
                  "threads_per_rank": b.threads, "token_dtype": b.token_dtype, "overrides": a.overrides},
        "environment": {**{k: b.env[k] for k in RECORDED_ENV}, **b.extra_env},
    }


def train_report(b: TrainBench, runs: list[dict], resolved: dict, loadavg: tuple, wall_start: float) -> dict:
    """The JSON document of one `megacpt bench train` (`loadavg`: before and after the rounds)."""
    ds_json = resolved["deepspeed"]
    return {
        **_machine(b, wall_start),
        **_setup(b),
        # megacpt's own CPU allocator setting (train.cpu_allocator); the peers run malloc as configured
        # by the environment above.
        "megacpt_caching_malloc": resolved.get("caching_malloc"),
        "flops_per_token": b.flops_per_token,
        "mfu_formula": "(6 × non-embedding params + 12 × layers × hidden × seq_len) × tokens/s per device "
                       "÷ dense bf16 peak (null where no peak is known, e.g. CPU)",
        # fp8 runs: the same formula against the bf16 peak, and numerics that differ from bf16;
        # report them beside bf16 runs, never pooled with them.
        "mfu_peak_basis": "dense bf16",
        "loadavg_before": loadavg[0],
        "loadavg_after": loadavg[1],
        "megacpt_config": resolved["config"],
        "deepspeed_config": ds_json,
        "comm_per_step": comm_for(b, ds_json),
        "results": system_results(b, runs),
        "ratios": peer_ratios(b, runs),
        "runs": runs,
        "order": [f"{r['system']}-r{r['round']}" for r in runs],
        "notes": NOTES,
    }


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

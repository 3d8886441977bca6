"""Where one training step of megacpt's own trainer goes: forward, backward, optimizer step and the
host gaps between them, and one profiled step binned by kernel kind. One process, writes JSON.

    python bench/step_anatomy.py --model llama3-1b --seq-len 4096 --zero-stage 1 --compile --json OUT.json

It runs the real trainer (megacpt.train.loop.train, a world of one, synthetic tokens) and wraps
the DeepSpeed engine's forward, backward and step on the instance as the trainer creates it, so
what is timed is train/step.py's step as users run it, not a copy of it.

Per step, from CUDA events recorded around each call (on CPU, where there are none, the host
clock): forward_ms, backward_ms, optimizer_ms (DeepSpeed's step: gradient copies, clipping, the
optimizer, the bf16 copy back), total_ms (from the end of the previous step to the end of this
one, on the GPU's timeline) and host_gap_ms = total - the three: the time the GPU spent outside
those calls (building batches, the loss all-reduce and its .item(), logging, Python between
kernels of the trainer's own). host_call_ms says how long each call took on the host to return.

Profile: the last step runs under torch.profiler. Each kernel (on CPU: each op's own time) goes
into one bin (`kernel_kind`): communication and attention by name; then loss, for every kernel
launched inside the LM head's loss (megacpt's LCE autograd function, forward or backward, or a
cross-entropy), its matmuls included; optimizer, for every kernel inside DeepSpeed's step; the
rest by name: gemm, elementwise, other. Compiled code (Inductor's triton_* kernels) is binned like
the rest and also summed as compiled_ms. On CUDA, device_events_ms is the kernel time the
profiler's device events add up to, to check that no kernel was left out of the bins.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from megacpt.bench.kernel_kinds import bin_kernels
from megacpt.bench.plan import write_token_shard
from megacpt.bench.report import versions
from megacpt.bench.shapes import resolve_model
from megacpt.config import load_config
from megacpt.models.hf import args_from_hf_config, read_hf_config
from megacpt.train import loop
from megacpt.train.metrics import device_name, peak_flops

# ----------------------------------------------------------------------------- the timed steps


class Anatomy:
    """Spans of the engine's calls per optimizer step, on the GPU's timeline (CUDA events) or the
    host clock; runs torch.profiler over step `profile_step` (counted from 0)."""

    def __init__(self, cuda: bool, profile_step: int):
        self.cuda = cuda
        self.profile_step = profile_step
        self.steps: list[dict] = []
        self.current: dict | None = None
        self.last_end = None
        self.prof = None

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def span(self, kind: str, fn):
        def timed(*args, **kwargs):
            if self.current is None:
                self._begin()
            h0, m0 = time.perf_counter(), self.mark()
            with record_function(f"megacpt::{kind}"):
                out = fn(*args, **kwargs)
            m1 = self.mark()
            self.current["spans"].append((kind, m0, m1, (time.perf_counter() - h0) * 1e3))
            return out
        return timed

    def optimizer_step(self, engine, fn):
        spanned = self.span("optimizer", fn)

        def step(*args, **kwargs):
            boundary = engine.is_gradient_accumulation_boundary()
            out = spanned(*args, **kwargs)
            if boundary:
                self._end()
            return out
        return step

    def _begin(self) -> None:
        self.current = {"index": len(self.steps), "spans": [], "prev_end": self.last_end}
        if self.current["index"] == self.profile_step:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()

    def _end(self) -> None:
        self.current["end"] = self.last_end = self.mark()
        if self.prof is not None and self.current["index"] == self.profile_step:
            if self.cuda:
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
        self.steps.append(self.current)
        self.current = None

    def table(self) -> list[dict]:
        """Per step: milliseconds per kind, total and host gap (needs every event completed)."""
        if self.cuda:
            torch.cuda.synchronize()
        rows = []
        for s in self.steps:
            row = {"step": s["index"] + 1, "forward_ms": 0.0, "backward_ms": 0.0, "optimizer_ms": 0.0,
                   "host_call_ms": {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}}
            for kind, m0, m1, host in s["spans"]:
                row[f"{kind}_ms"] += self.ms(m0, m1)
                row["host_call_ms"][kind] += host
            total = self.ms(s["prev_end"], s["end"]) if s["prev_end"] is not None else None
            row["total_ms"] = total
            busy = row["forward_ms"] + row["backward_ms"] + row["optimizer_ms"]
            row["host_gap_ms"] = None if total is None else total - busy
            rows.append(row)
        return rows


def instrument(engine, anatomy: Anatomy) -> None:
    """Wrap the engine's calls on this instance (nn.Module.__call__ looks `forward` up on it)."""
    engine.forward = anatomy.span("forward", engine.forward)
    engine.backward = anatomy.span("backward", engine.backward)
    engine.step = anatomy.optimizer_step(engine, engine.step)


# ----------------------------------------------------------------------------- the profile


def _scopes(event) -> tuple[str, ...]:
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return tuple(names)


def kernel_records(prof, cuda: bool) -> tuple[list[tuple[str, float, tuple]], float | None]:
    """(name, microseconds, CPU scopes) of every GPU kernel, or on CPU of every op's own time;
    and on CUDA the kernel time the profiler's device events add up to (a cross-check: kernels
    it could not tie to a CPU op are missing from the first list)."""
    events = prof.events()
    recs = []
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        if cuda:
            recs += [(k.name, k.duration, _scopes(e)) for k in e.kernels]
        else:
            recs.append((e.name, e.self_cpu_time_total, _scopes(e)))
    if not cuda:
        return recs, None
    device = [(e.name, e.time_range.elapsed_us(), ()) for e in events if e.device_type == DeviceType.CUDA]
    device_us = sum(us for _, us, _ in device)
    if not recs:  # no kernel tied to a CPU op: bin the device events by name alone
        recs = device
    return recs, device_us


# ----------------------------------------------------------------------------- the run


def run_config(a, hf_dir: Path, prefix: Path, run_dir: Path) -> dict:
    """The trainer's config: synthetic tokens, no eval, no checkpoint; warm-up, timed and one profiled step."""
    return {
        "run_dir": str(run_dir), "seed": 1234,
        "model": {"init_from": str(hf_dir), "compile": a.compile},
        "data": {"seq_len": a.seq_len, "train": [{"name": "synthetic", "path": str(prefix), "weight": 1.0}],
                 "valid": []},
        "train": {"steps": a.warmup + a.steps + 1, "micro_batch_size": a.micro_batch,
                  "global_batch_size": a.micro_batch, "eval_interval": 10**9, "log_interval": 1,
                  "eval_at_start": False},
        "schedule": {"kind": "constant", "warmup_steps": 0},
        "parallel": {"zero_stage": a.zero_stage},
        "precision": a.precision,
        "checkpoint": {"interval": 10**9, "keep": 1, "final": False},
        "tensorboard": False,
    }


def _median(rows: list[dict], key: str):
    xs = [r[key] for r in rows if r[key] is not None]
    return statistics.median(xs) if xs else None


def measure(a, work: Path) -> dict:
    cuda = torch.cuda.is_available()
    precision = a.precision if a.precision != "auto" else ("bf16" if cuda else "fp32")
    a.precision = precision
    hf_dir, shape = resolve_model(a.model, "float32" if precision == "fp32" else "bfloat16", a.cache_dir)
    margs = args_from_hf_config(read_hf_config(hf_dir), source=str(hf_dir))
    prefix = work / "data" / "synthetic"
    total = a.warmup + a.steps + 1
    write_token_shard(prefix, margs.vocab_size, (total + 4) * a.micro_batch * (a.seq_len + 1) + a.seq_len)
    cfg_path = work / "anatomy.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config(a, hf_dir, prefix, work / "run"), sort_keys=False))
    anatomy = Anatomy(cuda, profile_step=total - 1)
    original = loop.initialize

    def initialize(*args, **kwargs):
        engine = original(*args, **kwargs)
        instrument(engine, anatomy)
        return engine

    loop.initialize = initialize
    try:
        loop.train(load_config(cfg_path))
    finally:
        loop.initialize = original
    rows = anatomy.table()
    metrics = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    times = {m["step"]: m["step_time_s"] for m in metrics if "step_time_s" in m}
    for r in rows:
        r["trainer_step_time_s"] = times.get(r["step"])
    timed = rows[a.warmup:total - 1]
    med = {k: _median(timed, k) for k in ("forward_ms", "backward_ms", "optimizer_ms", "host_gap_ms", "total_ms")}
    tokens = a.micro_batch * a.seq_len
    flops = margs.flops_per_token(a.seq_len)
    dev = device_name()
    peak = peak_flops(dev)
    mfu = tokens * flops / (med["total_ms"] / 1e3) / peak if peak and med["total_ms"] else None
    return {
        "benchmark": "step_anatomy", "device": dev, "cuda": cuda, "versions": versions(),
        "model": {"arg": a.model, "shape": shape, "params": margs.num_params()},
        "setup": {"seq_len": a.seq_len, "micro_batch": a.micro_batch, "zero_stage": a.zero_stage,
                  "compile": a.compile, "precision": precision, "warmup_steps": a.warmup, "timed_steps": a.steps},
        "timing": "cuda events" if cuda else "host clock (no CUDA events on CPU)",
        "tokens_per_step": tokens, "flops_per_token": flops, "dense_bf16_peak_flops": peak,
        "median": med, "mfu_from_total": mfu,
        "peak_memory_mb": max((m.get("peak_memory_mb") or 0) for m in metrics if "step_time_s" in m),
        "steps": rows,
        "profile": {"step": total, **bin_kernels(*kernel_records(anatomy.prof, cuda))},
        "kinds_by": "kernel name, except loss (launched inside the LM head's loss, forward or backward) and "
                    "optimizer (inside DeepSpeed's step); communication and attention by name always; on CPU "
                    "each op's own time (bench/step_anatomy.py kernel_kind)",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3-1b", help="HF dir or shape name (megacpt.bench.shapes)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32", "fp8"])
    p.add_argument("--compile", action="store_true", help="model.compile: true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps (one profiled step follows)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="megacpt-anatomy-") as tmp:
        out = measure(a, Path(tmp))
    m = out["median"]
    print(f"step anatomy ({out['timing']}), median of {a.steps} steps: forward {m['forward_ms']:.1f} ms, "
          f"backward {m['backward_ms']:.1f} ms, optimizer {m['optimizer_ms']:.1f} ms, host gaps "
          f"{m['host_gap_ms']:.1f} ms, total {m['total_ms']:.1f} ms")
    for kind, v in out["profile"]["by_kind"].items():
        print(f"  {kind:<14} {v['ms']:9.2f} ms  {v['count']:6d} kernels")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

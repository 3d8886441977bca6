"""The measuring loop of `megacpt bench train`: for each round r = 1..--repeats, every system
once, one after the other (A B C A B C ...), each a fresh launch of N ranks; one record per run
with its step times, memory per rank, CPU time and losses."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from megacpt.bench.launch import fail, free_port, run_launcher
from megacpt.bench.plan import TrainBench, write_peer_spec
from megacpt.bench.report import percentile

PEER_OF = {"hf-deepspeed": "plain", "hf-trainer": "trainer"}


def run_rounds(b: TrainBench) -> tuple[list[dict], dict]:
    """Every run's record in the order run, and the first megacpt run's config.resolved.json
    (whose DeepSpeed JSON and optimizer values the peers then take, through their spec)."""
    runs: list[dict] = []
    resolved = None
    for rnd in range(1, b.a.repeats + 1):
        for system in b.systems:
            rec, out_dir = run_once(b, system, rnd)
            if system == "megacpt" and resolved is None:
                resolved = json.loads((out_dir / "config.resolved.json").read_text())
                write_peer_spec(b, resolved)
            runs.append(rec)
    return runs, resolved


def run_once(b: TrainBench, system: str, rnd: int) -> tuple[dict, Path]:
    """Launch `system` for round `rnd`; its record and output dir (megacpt's run dir)."""
    a = b.a
    tag = f"{system}-r{rnd}"
    log = b.work / "logs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    if system == "megacpt":
        out_dir, cmd = _megacpt_command(b, tag, port)
        progress = progress_reader(out_dir / "metrics.jsonl")
        # Memory: stop counting at the second-to-last step; the last one is followed at
        # once by the trainer's final checkpoint write, which a 0.2 s poll could catch.
        freeze = max(b.total_steps - 1, 1)
    else:
        out_dir, cmd = _peer_command(b, system, tag, port)
        progress = progress_reader(out_dir / "progress.jsonl", key="step_time_s")
        freeze = None
    print(f"[round {rnd}/{a.repeats}] {system}: {' '.join(cmd)}", flush=True)
    la0 = os.getloadavg()
    rc, wall, mon = run_launcher(cmd, b.env, log, a.timeout, b.nproc, progress, freeze)
    if rc != 0:
        fail(f"{system} (round {rnd})", rc, log)
    rec = {"system": system, "round": rnd, "command": cmd, "wall_s": wall, "exit_code": rc,
           "loadavg_before": la0, "loadavg_after": os.getloadavg()}
    if system == "megacpt":
        times = _megacpt_results(b, rec, out_dir, mon.peaks, log)
    else:
        times = _peer_results(b, rec, out_dir, mon.peaks, f"{system} (round {rnd})", log)
    rec["step_times_s"] = times
    rec["timed_step_times_s"] = times[a.warmup:]
    med = percentile(rec["timed_step_times_s"], 50)
    rec["tokens_per_s"] = b.tokens_per_step / med
    rec["cpu_marks"] = mon.cpu_marks
    cps = None if b.cuda else cpu_per_step(mon.cpu_marks, max(a.warmup, 1), b.total_steps)
    rec["cpu_s_per_step"] = cps
    rec["tokens_per_cpu_s"] = b.tokens_per_step / cps if cps else None
    print(f"[round {rnd}/{a.repeats}] {system}: median {med:.3f} s/step over {a.steps} timed steps "
          f"= {rec['tokens_per_s']:.1f} tokens/s (run wall {wall:.0f} s)", flush=True)
    return rec, out_dir


def _megacpt_command(b: TrainBench, tag: str, port: int) -> tuple[Path, list[str]]:
    run_dir = b.work / "runs" / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg_path = b.work / f"{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump({**b.cfg, "run_dir": str(run_dir)}, sort_keys=False))
    cmd = [b.ds_launcher, "--num_gpus", str(b.nproc), "--master_port", str(port), "--module",
           "megacpt.train", str(cfg_path)]
    for s in b.a.overrides:
        cmd += ["--set", s]
    return run_dir, cmd


def _peer_command(b: TrainBench, system: str, tag: str, port: int) -> tuple[Path, list[str]]:
    out_dir = b.work / "runs" / tag
    shutil.rmtree(out_dir, ignore_errors=True)
    spec = json.loads(b.spec_path.read_text())
    spec["out"] = str(out_dir)
    rspec = b.work / f"{tag}.json"
    rspec.write_text(json.dumps(spec, indent=1))
    return out_dir, [b.ds_launcher, "--num_gpus", str(b.nproc), "--master_port", str(port), "--module",
                     "megacpt.bench.peers", PEER_OF[system], str(rspec)]


def _megacpt_results(b: TrainBench, rec: dict, run_dir: Path, polled: dict, log: Path) -> list[float]:
    """Fill rec's memory and losses from metrics.jsonl; the step times of all steps."""
    total, nproc = b.total_steps, b.nproc
    metrics = read_metrics(run_dir)
    if len(metrics) < total:
        raise RuntimeError(f"megacpt wrote {len(metrics)} of {total} steps; log {log}")
    per_rank = [m.get("peak_memory_mb_per_rank") for m in metrics[:total]]
    if b.cuda and all(isinstance(p, list) and len(p) == nproc for p in per_rank):
        # a trainer that logs every rank's peak (all-gathered)
        rec["peak_memory_mb_per_rank"] = [max(p[k] for p in per_rank) for k in range(nproc)]
    elif b.cuda:
        rec["peak_memory_mb_per_rank"] = [max(m["peak_memory_mb"] for m in metrics)] + [None] * (nproc - 1)
    else:
        rec["peak_memory_mb_per_rank"] = [polled.get(r) for r in range(nproc)]
    rec["rank0_peak_memory_mb_from_metrics"] = max(m["peak_memory_mb"] for m in metrics)
    rec["losses"] = [m["loss"] for m in metrics[:total]]
    return [m["step_time_s"] for m in metrics[:total]]


def _peer_results(b: TrainBench, rec: dict, out_dir: Path, polled: dict, what: str, log: Path) -> list[float]:
    """Fill rec's memory and losses from the peer's rank{R}.json files; the step times of all steps."""
    ranks = []
    for r in range(b.nproc):
        p = out_dir / f"rank{r}.json"
        if not p.exists():
            raise RuntimeError(f"{what} wrote no {p.name}; log {log}")
        ranks.append(json.loads(p.read_text()))
    times = ranks[0]["step_times_s"]
    if len(times) < b.total_steps:
        raise RuntimeError(f"{what} timed {len(times)} of {b.total_steps} steps; log {log}")
    rec["peak_memory_mb_per_rank"] = [r["peak_memory_mb"] for r in ranks]
    rec["polled_peak_rss_mb_per_rank"] = [polled.get(r) for r in range(b.nproc)] if not b.cuda else None
    rec["losses"] = ranks[0]["losses"]
    return times[:b.total_steps]


def cpu_per_step(marks: list, first: int, last: int, min_window_s: float = 10.0) -> float | None:
    """CPU seconds (all ranks) per step between the first marks at or after steps `first` and `last`.

    None when the window is shorter than `min_window_s` (the 0.2 s polling would dominate it).
    """
    a = next((m for m in marks if m[0] >= first), None)
    b = next((m for m in marks if m[0] >= last), None)
    if a is None or b is None or b[0] <= a[0] or b[2] - a[2] < min_window_s:
        return None
    return (b[1] - a[1]) / (b[0] - a[0])


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

"""`megacpt bench memory`: ZeRO-3 model-state memory per rank at several world sizes.

For each world size W the bench starts W local ranks with the `deepspeed` launcher
(`python -m megacpt.bench.memory worker SPEC.json`). Each rank builds the model and engine the
way the trainer does (megacpt.train.engine.deepspeed_config, then megacpt.train.parallelize:
build_model under zero.Init, loading its own partition of the HF weights → initialize), runs one
optimizer step on random tokens, and then adds up, from the engine's own objects:

  params          each parameter's partition (p.ds_tensor: numel × element size, padding included)
  persistent      whole copies of parameters below stage3_param_persistence_threshold
                  (kept on every rank; 0 with the default --persistence-threshold 0)
  fp32_master     the optimizer's fp32 partitions (fp32_partitioned_groups_flat) where they are a
                  separate copy (fp32_master_shared tells). In fp32 DeepSpeed 0.19 means to reuse
                  the parameter partitions, but its check compares a torch.device with a string
                  ('cpu', 'cuda:0'), which is never equal, so it keeps a copy: 20 bytes/parameter.
                  megacpt.train.zero3_masters (called by parallelize.initialize) points the masters
                  back at the parameter partitions, so fp32 holds 16 and this is 0. In bf16 the
                  masters are separate by design (2-byte parameters, 4-byte masters).
  grads           the flat gradient-partition buffer (grad_partitions_flat_buffer)
  adam            every tensor in the inner optimizer's state (exp_avg, exp_avg_sq, step)

model_state = the sum; expected = 16 · P / W bytes (fp32: 4 parameter, which is the master, + 4
gradient + 8 Adam moments; bf16: 2 parameter + 2 gradient + 4 master + 8 Adam moments), and
bytes_per_param = model_state · W / P (the largest rank's). optimizer_state = fp32_master + grads +
adam: what training adds to the weights. --precision fp32,bf16 measures every world size in each.

Before the fix (bench/results/memory-zero3-small-cpu-20261123.json) fp32 came to 20.0 bytes per
parameter at world sizes 1, 2 and 4; with it 16.0 (memory-zero3-small-cpu-20261206-fixed.json,
bf16 16.0 in both).

--lora-r R[,R...] repeats every world size with a LoRA adapter of rank R on the attention and MLP
projections (R = 0: full fine-tuning), built as the trainer builds it (parallelize.py step 4b):
the frozen base keeps only its (partitioned) parameters, and only the T adapter parameters get
masters, gradients and Adam moments, so expected = (b · (P + T) + (16 − b) · T) / W with b the
parameter's bytes (4 in fp32, 2 in bf16), and bytes_per_param counts P + T. Buffers that are not
model state (the reduce bucket, allocated with torch.empty: on CPU untouched pages are not
resident) and the process RSS after the step (VmRSS, VmHWM) are reported next to it for context.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megacpt.bench.launch import bench_env, fail, free_port, launcher, run_launcher
from megacpt.bench.report import bench_command, versions, write_json
from megacpt.bench.shapes import resolve_model
from megacpt.config import AdapterConfig, config_from_dict, derive
from megacpt.errors import UserError
from megacpt.models import lora
from megacpt.models.hf import args_from_hf_config, read_hf_config
from megacpt.train import dist as mdist
from megacpt.train.engine import deepspeed_config, param_groups, resolve_precision
from megacpt.train.metrics import device_name, measure_engine
from megacpt.train.parallelize import BuildSpec, build_model, initialize

PRECISIONS = ("fp32", "bf16")


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def worker(spec: dict) -> int:
    info = mdist.discover()
    hf_dir = spec["hf_dir"]
    cfg = config_from_dict({
        "run_dir": spec["out"],
        "model": {"init_from": hf_dir},
        "data": {"seq_len": spec["seq_len"]},
        "train": {"micro_batch_size": 1, "global_batch_size": info.world_size},
        "parallel": {"zero_stage": 3},
        "precision": spec["precision"],
        "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": spec["persistence_threshold"]}},
    })
    derived = derive(cfg, info.world_size)
    mdist.init()
    rank, world = dist.get_rank(), dist.get_world_size()
    hf_cfg = read_hf_config(hf_dir)
    args = args_from_hf_config(hf_cfg)
    dtype = resolve_precision(cfg.precision)
    ds = deepspeed_config(cfg, derived, dtype)
    adapter = lora.resolve(AdapterConfig(r=spec["lora_r"]), args, hf_cfg) if spec.get("lora_r") else None
    model = build_model(BuildSpec(args, dtype=dtype, zero_stage=3, adapter=adapter), weights=hf_dir, ds_config=ds)
    engine = initialize(model, param_groups(model, 0.1), ds, topology=None)
    rng = np.random.default_rng(rank)
    x = torch.from_numpy(rng.integers(0, args.vocab_size, (1, spec["seq_len"] + 1)).astype(np.int64))
    loss = engine(x[:, :-1].to(engine.device), labels=x[:, 1:].to(engine.device))
    engine.backward(loss)
    engine.step()
    rec = measure_engine(engine)
    rec.update({"rank": rank, "world_size": world, "vm_rss_mb": _proc_status_mb("VmRSS"),
                "vm_hwm_mb": _proc_status_mb("VmHWM"), "param_dtype": str(dtype).replace("torch.", "")})
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(rec))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def run_memory_bench(a) -> int:
    """`megacpt bench memory` (a: its parsed arguments)."""
    worlds = _int_list(a.world_sizes, "--world-sizes", "1,2,4", minimum=1)
    ranks_r = _int_list(a.lora_r, "--lora-r", "0,8", minimum=0)
    precisions = _precision_list(a.precision)
    work = Path(tempfile.mkdtemp(prefix="megacpt-bench-memory-"))
    env = bench_env(a.threads)
    rows, hf_dirs = [], {}
    try:
        for prec in precisions:
            hf_dir, shape = resolve_model(a.model, "bfloat16" if prec == "bf16" else "float32", a.cache_dir)
            hf_dirs[prec] = str(hf_dir)
            hf_cfg = read_hf_config(hf_dir)
            margs = args_from_hf_config(hf_cfg, source=str(hf_dir / "config.json"))
            P = margs.num_params()
            for r in ranks_r:
                T = _adapter_params(margs, hf_cfg, r)
                for W in worlds:
                    spec = {"hf_dir": str(hf_dir), "seq_len": a.seq_len, "precision": prec,
                            "out": str(work / f"{prec}-r{r}w{W}"), "persistence_threshold": a.persistence_threshold,
                            "lora_r": r}
                    rows.append(_measure_world(spec, W, work, env, a.timeout, P, T))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "benchmark": "memory",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device_name(),
        "versions": versions(),
        "command": bench_command(),
        "model": {"arg": a.model, "shape": shape, "hf_dirs": hf_dirs, "params": P},
        "precisions": precisions,
        "persistence_threshold": a.persistence_threshold,
        "expectation": "16 · params / world_size bytes per rank (fp32: 4 param, shared with the fp32 master, "
                       "+ 4 gradient + 8 Adam moments; bf16: 2 param + 2 gradient + 4 fp32 master + 8 Adam "
                       "moments); with a LoRA adapter of T parameters (lora_r > 0) (b · (params + T) + (16 - b) · T) "
                       "/ world_size, b = 4 (fp32) or 2 (bf16)",
        "measured": "per rank after one step: parameter partitions + persistent whole parameters + fp32 master "
                    "partitions not shared with them + the gradient-partition buffer + Adam state tensors; "
                    "bytes_per_param_max = the largest rank's model state · world_size / (params + T)",
        "rows": rows,
    }
    print(format_memory_table(out), flush=True)
    if a.json:
        write_json(a.json, out)
    return 0


def _precision_list(text: str) -> list[str]:
    values = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in values if p not in PRECISIONS]
    if not values or bad or len(set(values)) != len(values):
        raise UserError(f"--precision {text!r}: give {' or '.join(PRECISIONS)}, or both comma-separated "
                        f"(e.g. fp32,bf16), each once")
    return values


def _adapter_params(margs, hf_cfg: dict, r: int) -> int:
    """Parameters of a rank-r LoRA adapter on the default targets (0 for r = 0: full fine-tuning)."""
    if not r:
        return 0
    spec = lora.resolve(AdapterConfig(r=r), margs, hf_cfg)
    return sum(math.prod(shape) for shape in lora.factor_shapes(margs, spec).values())


def _int_list(text: str, flag: str, example: str, minimum: int) -> list[int]:
    try:
        values = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers like {example}") from None
    if not values or min(values) < minimum:
        raise UserError(f"{flag}: give integers ≥ {minimum}, e.g. {example}")
    return values


def _measure_world(spec: dict, W: int, work: Path, env: dict, timeout: float, P: int, T: int) -> dict:
    """One launch of W ranks (LoRA rank spec["lora_r"], T adapter parameters; 0: full fine-tuning)."""
    name = Path(spec["out"]).name
    spec_path = work / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [launcher(), "--num_gpus", str(W), "--master_port", str(free_port()), "--module",
           "megacpt.bench.memory", "worker", str(spec_path)]
    print(f"world {W}, lora r {spec['lora_r']}: {' '.join(cmd)}", flush=True)
    log = work / f"{name}.log"
    rc, wall, _ = run_launcher(cmd, env, log, timeout)
    if rc != 0:
        fail(f"memory bench at world size {W} (lora r {spec['lora_r']})", rc, log)
    ranks = [json.loads((Path(spec["out"]) / f"rank{r}.json").read_text()) for r in range(W)]
    b = 2 if spec["precision"] == "bf16" else 4
    expected = 16 * P / W if not T else (b * (P + T) + (16 - b) * T) / W
    worst = max(r["model_state"] for r in ranks)
    return {"precision": spec["precision"], "world_size": W, "lora_r": spec["lora_r"], "trainable_params": T or P,
            "expected_bytes_per_rank": expected,
            "model_state_bytes_per_rank": [r["model_state"] for r in ranks],
            "optimizer_state_bytes_per_rank": [r["optimizer_state"] for r in ranks],
            "ratio_to_expected_max": worst / expected, "bytes_per_param_max": worst * W / (P + T),
            "ranks": ranks, "wall_s": wall, "command": cmd}


def format_memory_table(out: dict) -> str:
    mb = 2**20
    lines = ["", f"ZeRO-3 model state per rank · {out['model']['arg']} ({out['model']['params'] / 1e6:.2f}M params) · "
                 f"persistence threshold {out['persistence_threshold']}",
             f"{'prec':>4} {'lora r':>6} {'world':>5} {'expected MiB':>13} {'measured MiB (max)':>19} {'ratio':>6} "
             f"{'B/param':>7}  {'params':>8} {'master':>8} {'grads':>8} {'adam':>8} {'persist':>8}  "
             f"{'optim MiB':>9}  {'RSS MiB (max)':>13}"]
    for r in out["rows"]:
        worst = max(r["ranks"], key=lambda x: x["model_state"])
        lines.append(
            f"{r['precision']:>4} {r.get('lora_r', 0) or 'full':>6} {r['world_size']:>5} "
            f"{r['expected_bytes_per_rank'] / mb:>13.2f} {worst['model_state'] / mb:>19.2f} "
            f"{r['ratio_to_expected_max']:>6.3f} {r['bytes_per_param_max']:>7.2f}  {worst['params'] / mb:>8.2f} "
            f"{worst['fp32_master'] / mb:>8.2f} {worst['grads'] / mb:>8.2f} {worst['adam'] / mb:>8.2f} "
            f"{worst['persistent'] / mb:>8.2f}  {max(x['optimizer_state'] for x in r['ranks']) / mb:>9.3f}  "
            f"{max(x['vm_rss_mb'] or 0 for x in r['ranks']):>13.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megacpt.bench.memory")
    p.add_argument("mode", choices=["worker"])
    p.add_argument("spec")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    a = p.parse_args(argv)
    return worker(json.loads(Path(a.spec).read_text()))


if __name__ == "__main__":
    sys.exit(main())

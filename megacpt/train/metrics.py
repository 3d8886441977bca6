"""Metrics: FLOPs/MFU accounting and the rank-0 sinks (console, metrics.jsonl, TensorBoard, and the
W&B/MLflow trackers of trackers.py).

MFU = (6 × non-embedding params + 12 × layers × hidden × seq_len) × tokens/s per device
      ÷ the device's dense bf16 peak. The output head counts as non-embedding. On devices with
no known peak (CPUs, unknown GPUs) MFU is null rather than a guess.
"""

from __future__ import annotations

import json
import math
import platform
import resource
import sys
from pathlib import Path

import torch

from megacpt.config import Config, tracker_backends
from megacpt.train.trackers import Trackers, open_trackers

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, by a substring of the device name.
# Ordered most specific first.
DENSE_BF16_PEAK = [
    ("H200", 989e12),
    ("H100 SXM", 989e12),
    ("H100 80GB HBM3", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
    ("MI300X", 1307e12),
]


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def peak_flops(name: str) -> float | None:
    if name.startswith("cpu"):
        return None
    for key, peak in DENSE_BF16_PEAK:
        if key in name:
            return peak
    return None


def _nbytes(t) -> int:
    return int(t.numel()) * int(t.element_size())


def measure_engine(engine) -> dict:
    """Model-state bytes this rank holds, by kind (megacpt/bench/memory.py's docstring explains them).
    Adam moments count whatever the inner optimizer holds; fp32 masters only where they are a copy
    (ZeRO-3's partitioned flat groups, ZeRO-1/2's fp32 partitions), not where they alias the params."""
    opt = engine.optimizer
    params = persistent = 0
    for p in engine.module.parameters():
        if hasattr(p, "ds_tensor"):
            params += _nbytes(p.ds_tensor)
            if getattr(p, "ds_persist", False):
                persistent += _nbytes(p.data)
        else:
            params += _nbytes(p.data)
    lp = list(getattr(opt, "fp16_partitioned_groups_flat", [])) + list(getattr(opt, "bit16_groups_flat", []))
    lp_ptrs = {t.untyped_storage().data_ptr() for t in lp if t is not None and t.numel()}
    master = 0
    shared = True
    masters = getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(opt, "single_partition_of_fp32_groups", [])
    for t in masters:
        if t is None or not t.numel():
            continue
        if t.untyped_storage().data_ptr() in lp_ptrs:
            continue
        shared = False
        master += _nbytes(t)
    gbuf = getattr(opt, "grad_partitions_flat_buffer", None)
    grads = _nbytes(gbuf) if gbuf is not None else 0
    inner = getattr(opt, "optimizer", opt)
    adam = 0
    for st in inner.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                adam += _nbytes(v)
    buffers = 0
    for bucket in getattr(opt, "ipg_buckets", {}).values():
        buf = getattr(bucket, "buffer", None)
        if isinstance(buf, torch.Tensor):
            buffers += _nbytes(buf)
    return {"params": params, "persistent": persistent, "fp32_master": master, "fp32_master_shared": shared,
            "grads": grads, "adam": adam, "model_state": params + persistent + master + grads + adam,
            "optimizer_state": master + grads + adam, "reduce_bucket_allocated": buffers}


def model_state_record(engine) -> dict:
    """What the run trains, logged once after its first step (Adam's moments exist only then):
    parameters with and without gradients in this rank's model part (the whole model unless TP/PP
    split it; ZeRO-3 counts the full tensors) and this rank's optimizer state (moments + fp32 masters)."""
    counts = {True: 0, False: 0}
    for p in engine.module.parameters():
        counts[p.requires_grad] += int(getattr(p, "ds_numel", p.numel()))
    mem = measure_engine(engine)
    return {"event": "model_state", "trainable_params": counts[True], "frozen_params": counts[False],
            "optimizer_state_mb": mem["optimizer_state"] / 2**20}


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20

    # ru_maxrss is in KiB on Linux: the process's peak resident set.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def throughput(tokens: int, seconds: float, world_size: int, flops_per_token: float, peak: float | None) -> dict:
    tps = tokens / seconds if seconds > 0 else float("nan")
    per_dev = tps / world_size
    tflops = flops_per_token * per_dev / 1e12
    return {
        "tokens_per_s": tps,
        "tokens_per_s_per_device": per_dev,
        "tflops_per_device": tflops,
        "mfu": (tflops * 1e12 / peak) if peak else None,
    }


class MetricsLogger:
    """Writes on rank 0 only; other ranks get a logger that drops everything."""

    def __init__(self, run_dir, enabled: bool, cfg: Config):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        self._trackers = Trackers([])
        if not enabled:
            return
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run / "metrics.jsonl", "a", buffering=1)
        backends = tracker_backends(cfg)
        self._trackers = Trackers(open_trackers(backends, run, cfg.to_dict(), cfg.logging.project,
                                                [*cfg.logging.tags, cfg.task]))
        if "tensorboard" in backends:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard: false runs lack it

                self._tb = SummaryWriter(str(run / "tensorboard"))
            except ImportError:
                print("warning: tensorboard not installed; metrics go to metrics.jsonl only", file=sys.stderr)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) and k != "loss" else v)
                 for k, v in record.items()}
        # json.dumps writes NaN for a diverged loss; readers of metrics.jsonl accept it (Python's json does).
        self._jsonl.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    self._tb.add_scalar(k, v, step)
        self._trackers.log(record)

    def close(self) -> None:
        self._trackers.close()
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def format_console(record: dict) -> str:
    fields = [("loss", "loss={:.4f}"), ("lr", "lr={:.2e}"), ("grad_norm", "gnorm={:.3f}"),
              ("tokens_per_s", "{:.0f} tok/s"), ("step_time_s", "{:.2f} s/step")]
    shown = [fmt.format(record[k]) for k, fmt in fields if record.get(k) is not None]
    return " | ".join([f"step {record['step']}"] + shown)

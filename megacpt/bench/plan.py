"""Set-up of `megacpt bench train`, fixed before the first launch: the checked command line, the
model and batch geometry, the ranks' environment, the work dir with its synthetic token shard,
the megacpt config every round runs, and the spec the peers read."""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megacpt.bench.launch import bench_env, launcher, parse_env, usable_cores
from megacpt.bench.shapes import resolve_model
from megacpt.data.dataset import BlendedDataset, Source
from megacpt.data.indexed import IndexedDatasetWriter
from megacpt.errors import UserError
from megacpt.models.hf import args_from_hf_config, read_hf_config
from megacpt.models.llama import ModelArgs
from megacpt.train.float8 import check_float8
from megacpt.train.metrics import device_name, peak_flops

SYSTEMS = ("megacpt", "hf-deepspeed", "hf-trainer")
PEER_LETTERS = {"a": "hf-deepspeed", "b": "hf-trainer"}


@dataclass
class TrainBench:
    """Everything the rounds and the report read besides the runs themselves."""

    a: argparse.Namespace  # the command line as parsed
    margs: ModelArgs
    hf_dir: Path
    shape: str | None  # the shape name --model named, None for an HF dir
    cuda: bool
    nproc: int
    dp: int
    precision: str
    threads: int
    global_batch: int
    total_steps: int  # --warmup + --steps
    tokens_per_step: int
    flops_per_token: float
    device: str
    peak: float | None  # dense bf16 FLOP/s of the device, None where unknown
    extra_env: dict  # --env items
    env: dict  # every rank's environment: bench_env(threads) + extra_env
    ds_launcher: str
    work: Path
    keep: bool  # --work-dir given: the work dir stays
    systems: list[str]
    # Written by prepare_data:
    data_prefix: Path | None = None
    token_dtype: str | None = None
    n_samples: int = 0
    cfg: dict | None = None

    @property
    def spec_path(self) -> Path:
        return self.work / "peer_spec.json"


def _check_args(a) -> None:
    for name in ("seq_len", "micro_batch", "grad_accum", "steps", "repeats", "tp", "pp"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if a.warmup < 0:
        raise UserError("--warmup must be ≥ 0")


def _check_layout(a, nproc: int) -> None:
    if nproc < 1:
        raise UserError("--nproc must be at least 1")
    if nproc % (a.tp * a.pp):
        raise UserError(f"--nproc {nproc} is not divisible by --tp × --pp = {a.tp * a.pp}")
    if a.peers and (a.tp > 1 or a.pp > 1):
        raise UserError("--peers compares data-parallel ZeRO runs; use --tp 1 --pp 1 with --peers")


def systems_for(peers: str | None) -> list[str]:
    """--peers: None (megacpt alone), "a,b" (both; a bare --peers), "a" or "b"."""
    if peers is None:
        return [SYSTEMS[0]]
    letters = [x.strip() for x in peers.split(",") if x.strip()]
    bad = [x for x in letters if x not in PEER_LETTERS]
    if bad or not letters:
        raise UserError(f"--peers {peers!r}: name peers a and/or b (e.g. --peers a, or --peers for both)")
    return [SYSTEMS[0]] + [s for k, s in PEER_LETTERS.items() if k in letters]


def _check_precision(a) -> None:
    if a.precision != "fp8":
        return
    if a.peers is not None:
        raise UserError("--precision fp8 runs megacpt alone (the peers have no fp8 path, and fp8 numerics differ "
                        "from bf16): drop --peers and compare against a bf16 run")
    check_float8()


def plan_train_bench(a) -> TrainBench:
    """Check the command line, resolve (or build) the model and create the work dir."""
    _check_args(a)
    extra_env = parse_env(a.extra_env)
    systems = systems_for(a.peers)
    _check_precision(a)
    cuda = torch.cuda.is_available()
    nproc = a.nproc or (torch.cuda.device_count() if cuda else 2)
    _check_layout(a, nproc)
    precision = a.precision if a.precision != "auto" else ("bf16" if cuda else "fp32")
    threads = a.threads or max(1, usable_cores() // nproc)
    # fp8 runs keep bf16 weights (megacpt/train/float8.py)
    hf_dir, shape = resolve_model(a.model, "float32" if precision == "fp32" else "bfloat16", a.cache_dir)
    margs = args_from_hf_config(read_hf_config(hf_dir), source=str(hf_dir / "config.json"))
    if a.seq_len > margs.max_position_embeddings:
        raise UserError(f"--seq-len {a.seq_len} exceeds the model's max_position_embeddings "
                        f"{margs.max_position_embeddings}")
    dp = nproc // (a.tp * a.pp)
    G = a.micro_batch * dp * a.grad_accum
    dev = device_name()
    ds_launcher = launcher()
    keep = a.work_dir is not None
    work = Path(a.work_dir) if keep else Path(tempfile.mkdtemp(prefix="megacpt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    return TrainBench(
        a=a, margs=margs, hf_dir=hf_dir, shape=shape, cuda=cuda, nproc=nproc, dp=dp, precision=precision,
        threads=threads, global_batch=G, total_steps=a.warmup + a.steps, tokens_per_step=G * a.seq_len,
        flops_per_token=margs.flops_per_token(a.seq_len), device=dev, peak=peak_flops(dev), extra_env=extra_env,
        env={**bench_env(threads), **extra_env}, ds_launcher=ds_launcher, work=work, keep=keep,
        systems=systems)


def prepare_data(b: TrainBench) -> None:
    """The synthetic token shard (enough windows for every step, with room to spare) and the
    megacpt config every round runs."""
    b.data_prefix = b.work / "data" / "synthetic"
    b.n_samples = (b.total_steps + 4) * b.global_batch
    b.token_dtype = write_token_shard(b.data_prefix, b.margs.vocab_size, b.n_samples * (b.a.seq_len + 1) + b.a.seq_len)
    b.cfg = megacpt_config(b, b.work / "runs" / "megacpt")


def write_token_shard(prefix: Path, vocab: int, n_tokens: int, seed: int = 0) -> str:
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


def megacpt_config(b: TrainBench, run_dir: Path) -> dict:
    """Eval off and no checkpoints before the end (interval beyond the run, checkpoint.final off)."""
    a = b.a
    return {
        "run_dir": str(run_dir),
        "seed": 1234,
        "model": {"init_from": str(b.hf_dir)},
        "data": {"seq_len": a.seq_len, "train": [{"name": "synthetic", "path": str(b.data_prefix), "weight": 1.0}],
                 "valid": []},
        "train": {"steps": b.total_steps, "micro_batch_size": a.micro_batch, "global_batch_size": b.global_batch,
                  "eval_interval": 10**9, "log_interval": 1, "eval_at_start": False},
        "schedule": {"kind": "constant", "warmup_steps": 0},
        "parallel": {"zero_stage": a.zero_stage, "tp": a.tp, "pp": a.pp},
        "precision": b.precision,
        "checkpoint": {"interval": 10**9, "keep": 1, "final": False},
        "tensorboard": False,
    }


def build_samples(path: Path, data_prefix: Path, seq_len: int, n: int, seed: int, vocab: int) -> None:
    """The token windows megacpt's pipeline gives samples 0..n-1 (same source name and seed as the run)."""
    ds = BlendedDataset([Source("synthetic", str(data_prefix), 1.0)], seq_len, seed, n, vocab_size=vocab)
    arr = np.stack([ds[i]["tokens"] for i in range(n)]).astype(np.int32 if vocab >= 65500 else np.uint16)
    np.save(path, arr)


def write_peer_spec(b: TrainBench, resolved: dict) -> None:
    """The peers' SPEC.json (megacpt.bench.peers): megacpt's DeepSpeed JSON and optimizer values
    from its resolved config, and the token windows its pipeline produced."""
    if len(b.systems) == 1:
        return
    a = b.a
    samples = b.work / "data" / "samples.npy"
    build_samples(samples, b.data_prefix, a.seq_len, b.n_samples, b.cfg["seed"], b.margs.vocab_size)
    o = resolved["config"]["optim"]
    spec = {
        "hf_dir": str(b.hf_dir),
        "ds_config": resolved["deepspeed"],
        "samples": str(samples),
        "steps": b.total_steps,
        "seq_len": a.seq_len,
        "micro_batch": a.micro_batch,
        "grad_accum": a.grad_accum,
        "global_batch": b.global_batch,
        "precision": b.precision,
        "seed": b.cfg["seed"],
        "activation_checkpointing": bool(resolved["config"]["model"].get("activation_checkpointing")),
        "optim": {"lr": o["lr"], "betas": [o["beta1"], o["beta2"]], "eps": o["eps"],
                  "weight_decay": o["weight_decay"], "grad_clip": o["grad_clip"]},
    }
    b.spec_path.write_text(json.dumps(spec, indent=1))

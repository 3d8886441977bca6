"""Peer baselines for `megacpt bench train --peers`: what a user would run instead of megacpt.

  plain    transformers' AutoModelForCausalLM + deepspeed.initialize in a hand-written loop
           (peer a); ZeRO-3 models are built through transformers' HfDeepSpeedConfig so that
           from_pretrained partitions them (zero.Init) as it loads
  trainer  the transformers Trainer with TrainingArguments(deepspeed=<the same JSON>) (peer b)

Both are started by the bench exactly like megacpt's own ranks: the `deepspeed` launcher,
`--module megacpt.bench.peers {plain|trainer} SPEC.json`, the same environment. SPEC.json (written
by the bench) holds the HF dir, the DeepSpeed JSON taken from the megacpt run's
config.resolved.json, batch geometry, optimizer values and a .npy of the token windows
(samples × (seq_len+1)) that megacpt's data pipeline produced for the same steps.

Inputs are the first seq_len tokens of each window (the same model input shape as megacpt);
labels are the same ids, shifted inside the HF model (its convention). Every rank writes
OUT/rank{R}.json: per-step wall times, its peak memory (peak RSS on CPU, max_memory_allocated on
CUDA) and losses.

Step time: plain — from fetching the step's micro-batches to after the optimizer step and the
loss all-reduce (the span megacpt's step_time_s covers); trainer — between consecutive
`on_step_end` callbacks (everything the Trainer does per step, logging included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Progress:
    """Rank 0 appends {"step", "step_time_s"} per step to OUT/progress.jsonl (the bench watches it)."""

    def __init__(self, spec, rank: int):
        self.f = None
        if rank == 0:
            out = Path(spec["out"])
            out.mkdir(parents=True, exist_ok=True)
            self.f = open(out / "progress.jsonl", "a", buffering=1)

    def step(self, step: int, seconds: float) -> None:
        if self.f is not None:
            self.f.write(json.dumps({"step": step, "step_time_s": seconds}) + "\n")


def _dtype(spec):
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["precision"]]


def _write(spec, rank: int, times: list, losses: list, extra: dict | None = None) -> None:
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    rec = {"rank": rank, "step_times_s": times, "losses": losses, "peak_memory_mb": _peak_memory_mb()}
    rec.update(extra or {})
    (out / f"rank{rank}.json").write_text(json.dumps(rec))


def run_plain(spec: dict) -> int:
    # deepspeed and transformers take seconds to import; only the peer that uses them pays for it.
    import deepspeed
    from transformers import AutoModelForCausalLM

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = spec["ds_config"]
    keep = None
    if ds.get("zero_optimization", {}).get("stage", 0) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds)  # noqa: F841 -- must stay alive while the model is built
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=_dtype(spec))
    if spec.get("activation_checkpointing"):
        model.gradient_checkpointing_enable()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad], config=ds)
    engine.train()
    samples = np.load(spec["samples"], mmap_mode="r")
    S, mb, gas, G = spec["seq_len"], spec["micro_batch"], spec["grad_accum"], spec["global_batch"]
    dp = world
    times, losses = [], []
    progress = Progress(spec, rank)
    for step in range(spec["steps"]):
        t0 = time.perf_counter()
        # On the device, so NCCL can reduce it and the loop never waits on the GPU mid-step.
        total = torch.zeros(1, dtype=torch.float64, device=engine.device)
        for m in range(gas):
            first = step * G + m * mb * dp + rank * mb
            x = torch.from_numpy(np.asarray(samples[first:first + mb, :S], dtype=np.int64)).to(engine.device)
            out = engine(input_ids=x, labels=x)
            engine.backward(out.loss)
            engine.step()
            total += out.loss.detach().double()
        dist.all_reduce(total)
        total = total.cpu()
        times.append(time.perf_counter() - t0)
        progress.step(step + 1, times[-1])
        losses.append(float(total) / (gas * dp))
        if rank == 0:
            print(f"step {step + 1} | loss={losses[-1]:.4f} | {times[-1]:.2f} s/step", flush=True)
    _write(spec, rank, times, losses)
    dist.barrier()
    return 0


def _accelerate_cpu_workaround() -> bool:
    """Let accelerate see a multi-rank CPU DeepSpeed launch as multi-rank.

    accelerate 1.x picks no process-group backend for a non-CPU-flagged launch without an
    accelerator, so under `deepspeed --num_gpus N` on CPU every rank's TrainingArguments reports
    world_size 1 (while DeepSpeed itself shards over N) and the Trainer refuses the DeepSpeed
    JSON's train_batch_size. Returning gloo / MULTI_CPU there (what accelerate does when told
    cpu=True) fixes the bookkeeping; the state still becomes DEEPSPEED and the training path is
    the Trainer's own. Only applied without CUDA.
    """
    if torch.cuda.is_available() or int(os.environ.get("LOCAL_RANK", -1)) == -1:
        return False
    # accelerate comes with transformers' Trainer and is as slow to import: only the peer b ranks need it.
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    orig = PartialState._prepare_backend

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        b, kind = orig(self, cpu, sagemaker_dp, backend)
        if b is None and kind == DistributedType.NO:
            return "gloo", DistributedType.MULTI_CPU
        return b, kind

    PartialState._prepare_backend = _prepare_backend
    return True


def _bf16_cpu_workaround(bf16: bool) -> bool:
    """Let TrainingArguments(bf16=True) through on a CPU DeepSpeed launch.

    transformers 5.x refuses bf16 without a bf16 GPU unless use_cpu=True, and use_cpu=True skips
    its DeepSpeed set-up. DeepSpeed's JSON (the same for every system) decides the precision
    anyway, and on CPUs with bf16 units DeepSpeed's bf16 ZeRO path runs fine, so the check is
    told the truth about this machine instead: bf16 works here. Only applied without CUDA.
    """
    if not bf16 or torch.cuda.is_available():
        return False
    import transformers.training_args as ta  # heavy; only the peer b ranks import it

    ta.is_torch_bf16_gpu_available = lambda *a, **k: True
    return True


def _training_args(spec: dict):
    """TrainingArguments with the spec's batch geometry, optimizer values and DeepSpeed JSON."""
    from transformers import TrainingArguments  # heavy; only the peer b ranks import it

    o = spec["optim"]
    return TrainingArguments(
        output_dir=str(Path(spec["out"]) / "trainer_out"),
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["grad_accum"],
        max_steps=spec["steps"],
        learning_rate=o["lr"],
        adam_beta1=o["betas"][0],
        adam_beta2=o["betas"][1],
        adam_epsilon=o["eps"],
        weight_decay=o["weight_decay"],
        max_grad_norm=o["grad_clip"],
        lr_scheduler_type="constant",
        bf16=spec["precision"] == "bf16",
        deepspeed=spec["ds_config"],  # before from_pretrained: ZeRO-3 then builds the model partitioned
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=spec.get("seed", 1234),
        gradient_checkpointing=bool(spec.get("activation_checkpointing")),
    )


def run_trainer(spec: dict) -> int:
    # transformers takes seconds to import; only the peer that uses it pays for it.
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

    patched = _accelerate_cpu_workaround()
    bf16_patched = _bf16_cpu_workaround(spec["precision"] == "bf16")
    args = _training_args(spec)
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=_dtype(spec))
    samples = np.load(spec["samples"], mmap_mode="r")
    S = spec["seq_len"]

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            x = torch.from_numpy(np.asarray(samples[i, :S], dtype=np.int64))
            return {"input_ids": x, "labels": x}

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.last, self.progress = [], None, None

        def on_train_begin(self, a, state, control, **kw):
            self.progress = Progress(spec, a.process_index)
            self.last = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now
            self.progress.step(state.global_step, self.times[-1])

    timer = Timer()
    trainer = Trainer(model=model, args=args, train_dataset=Windows(), callbacks=[timer])
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    _write(spec, rank, timer.times, losses, {"world_size_seen_by_trainer": args.world_size,
                                             "accelerate_cpu_workaround": patched,
                                             "bf16_cpu_workaround": bf16_patched})
    if dist.is_initialized():
        dist.barrier()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megacpt.bench.peers")
    p.add_argument("which", choices=["plain", "trainer"])
    p.add_argument("spec")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    a = p.parse_args(argv)
    spec = json.loads(Path(a.spec).read_text())
    return run_plain(spec) if a.which == "plain" else run_trainer(spec)


if __name__ == "__main__":
    sys.exit(main())

"""One optimizer step: this rank's micro-batches, the token-mean loss scaling, the grad norm.

The loss of a step is the mean over all non-ignored tokens of the global batch, not a mean of
micro-batch means: every rank counts its target tokens, the count is all-reduced over the
data-parallel group, and each micro-batch's summed loss is scaled by dp × gas / tokens, which
DeepSpeed's division by the accumulation steps and its averaging over dp ranks turn into exactly
that token mean. Sums run over the data-parallel group only: tensor-parallel ranks hold the same
batch and would count it tp times.

Context parallelism (parallel.cp): the cp ranks of one data-parallel index read the same samples
(rank_batches with the dp rank), then each keeps its block of positions of input_ids and labels
(cp_shard); segment ids stay whole (the key side of the document mask and the per-document
positions need the whole sequence). To ZeRO and DeepSpeed's gradient average the cp ranks are
data-parallel ranks, so the token count and loss sums run over the grad group (dp × cp) and the
scale is dp · cp × gas / tokens: the loss stays the token mean of the global batch.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megacpt.labels import IGNORE
from megacpt.parallel import tp_grad_norm


@dataclass
class StepOut:
    loss: float  # token mean over the global batch
    grad_norm: float | None
    fingerprint: int
    stop_signal: bool


def rank_batches(dataset, first_sample: int, mb: int, gas: int, dp_rank: int, dp_size: int,
                 mask_eos: bool) -> list[dict]:
    """This rank's micro-batches of a global batch: micro-step m takes samples
    first + m·mb·dp + dp_rank·mb + [0, mb)."""
    out = []
    for m in range(gas):
        base = first_sample + m * mb * dp_size + dp_rank * mb
        items = [dataset[base + j] for j in range(mb)]
        tokens = torch.from_numpy(np.stack([it["tokens"] for it in items]).astype(np.int64))
        segs = torch.from_numpy(np.stack([it["segments"] for it in items]).astype(np.int64))
        labels = tokens[:, 1:].clone()
        if mask_eos:
            # A label in another document than its input position (the token after an EOS).
            labels[segs[:, 1:] != segs[:, :-1]] = IGNORE
        # Order-independent fingerprint of the samples seen (summed over ranks and micro-batches):
        # equal fingerprints per step mean the same samples whatever the layout or resume point.
        fp = sum(zlib.crc32(it["tokens"].astype(np.int64).tobytes()) for it in items)
        out.append({"input_ids": tokens[:, :-1].contiguous(), "labels": labels, "segments": segs[:, :-1].contiguous(),
                    "fingerprint": fp})
    return out


def cp_shard(batch: dict, cp) -> dict:
    """This context-parallel rank's block of positions of a micro-batch (input_ids, labels);
    the segment ids stay whole. Unchanged when cp is None."""
    if cp is None:
        return batch
    return {**batch, "input_ids": cp.shard(batch["input_ids"]).contiguous(),
            "labels": cp.shard(batch["labels"]).contiguous()}


def global_token_count(batches: list[dict], dp_group) -> float:
    """Target tokens of the whole global batch (at least 1, so an all-ignored batch divides safely)."""
    local = torch.tensor([sum(int((b["labels"] != IGNORE).sum()) for b in batches)], dtype=torch.float64)
    dist.all_reduce(local, group=dp_group)
    return max(float(local.item()), 1.0)


def batch_fingerprint(batches: list[dict], dp_group) -> int:
    fingerprint = torch.tensor([sum(b["fingerprint"] for b in batches)], dtype=torch.int64)
    dist.all_reduce(fingerprint, group=dp_group)
    return int(fingerprint)


def set_batch_shape(engine, micro_batch: int, gas: int) -> None:
    """Tell DeepSpeed a phase's micro-batch size and accumulation steps (it fixes both at
    initialize; a phase may change them). Its backward divides by the accumulation steps, which
    the loss scaling in train_step relies on; the boundary itself is set per micro-batch there."""
    if engine.train_micro_batch_size_per_gpu() == micro_batch and engine.gradient_accumulation_steps() == gas:
        return
    engine.set_train_micro_batch_size(micro_batch)
    engine.set_train_batch_size(micro_batch * gas * engine.dp_world_size)
    if hasattr(engine.optimizer, "gradient_accumulation_steps"):
        # ZeRO-1/2 with CPU offload picks its gradient buffer by this copy.
        engine.optimizer.gradient_accumulation_steps = gas


@dataclass
class StepInputs:
    """What one step needs besides the engine: the batches and how to run them."""
    batches: list[dict]
    gas: int
    stop_flag: bool
    use_segments: bool
    poison: bool = False  # fault injection (MEGACPT_FAULT=nan:PHASE:BATCH): a diverging batch
    cp: object = None  # context parallelism: parallel/cp.py UlyssesAttention of this rank's group


def train_step(engine, topo, zero_stage: int, inputs: StepInputs, where: dict) -> StepOut:
    """One optimizer step over this rank's micro-batches (the non-pipeline engine)."""
    batches = [cp_shard(b, inputs.cp) for b in inputs.batches]
    where["op"] = "all-reduce of the token count"
    global_tokens = global_token_count(batches, topo.grad_group)
    scale = topo.grad_size * inputs.gas / global_tokens
    loss_sum = torch.zeros((), dtype=torch.float64)
    plain_norm = None
    device = engine.device
    for i, b in enumerate(batches):
        kwargs = {"segment_ids": b["segments"].to(device)} if inputs.use_segments else {}
        if "pool_index" in b:  # task: classify
            kwargs["pool_index"] = b["pool_index"].to(device)
        # Explicit, not DeepSpeed's micro-step counter modulo the accumulation steps: after a phase
        # changes them, the counter is no longer a multiple of the new value.
        engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
        if inputs.cp is not None:
            kwargs["cp"] = inputs.cp
        where["op"] = f"forward of micro-batch {i} (ZeRO parameter all-gather)"
        out = engine(b["input_ids"].to(device), labels=b["labels"].to(device), **kwargs)
        if inputs.poison:
            out = out * float("nan")
        where["op"] = f"backward of micro-batch {i} (gradient reduce-scatter)"
        engine.backward(out * scale)
        if i == len(batches) - 1 and zero_stage == 0:
            # Without ZeRO, DeepSpeed clips but does not report the norm: measure the
            # (already data-parallel averaged) gradients before the optimizer step.
            plain_norm = float(tp_grad_norm(engine.module, topo))
        where["op"] = "optimizer step"
        engine.step()
        loss_sum += out.detach().double().cpu()
    where["op"] = "all-reduce of the loss and stop flag"
    stats = torch.stack([loss_sum, torch.tensor(float(inputs.stop_flag), dtype=torch.float64)])
    dist.all_reduce(stats[:1], group=topo.grad_group)
    dist.all_reduce(stats[1:], op=dist.ReduceOp.MAX)  # the stop decision spans the whole world
    fingerprint = batch_fingerprint(inputs.batches, topo.dp_group)
    norm = plain_norm if plain_norm is not None else engine.get_global_grad_norm()
    return StepOut(loss=float(stats[0]) / global_tokens, grad_norm=None if norm is None else float(norm),
                   fingerprint=fingerprint, stop_signal=bool(stats[1] > 0))

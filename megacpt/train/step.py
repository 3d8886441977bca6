"""One optimizer step: this rank's micro-batches, the token-mean loss scaling, the grad norm.

The loss of a step is the mean over all non-ignored tokens of the global batch, not a mean of
micro-batch means: every rank counts the target tokens of the whole global batch itself (the
data is a pure function of the sample index, so it reads every data-parallel rank's micro-batches:
`global_batch`, no collective), and each micro-batch's summed loss is scaled by dp × gas / tokens,
which DeepSpeed's division by the accumulation steps and its averaging over dp ranks turn into
exactly that token mean. The samples fingerprint is computed the same way.

Host work per step (issue 23): megacpt's own bookkeeping is ONE all-reduce per step, of a small
vector on the engine's device (`reduce_step`): the loss sum, a non-finite flag, the stop flag
and the gradient norm, summed over the whole world, each term contributed by the ranks that own
it (tensor-parallel ranks hold the same loss and count it once), and read back with the step's
only device-to-host copy. The micro-batches' copies to the device are all queued at the start
(from pinned memory on CUDA, so they overlap the compute), and the next step's batches are built
between that all-reduce and the read (`StepInputs.ahead`), while the device still works.

Context parallelism (parallel.cp): the cp ranks of one data-parallel index read the same samples
(rank_batches with the dp rank), then each keeps its block of positions of input_ids and labels
(cp_shard); segment ids stay whole (the key side of the document mask and the per-document
positions need the whole sequence). To ZeRO and DeepSpeed's gradient average the cp ranks are
data-parallel ranks, so the loss sums run over dp × cp and the scale is dp · cp × gas / tokens:
the loss stays the token mean of the global batch.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megacpt.labels import IGNORE
from megacpt.parallel import tp_grad_sq


@dataclass
class StepOut:
    loss: float  # token mean over the global batch
    grad_norm: float | None
    fingerprint: int
    stop_signal: bool
    nonfinite: bool = False  # some rank's own loss or gradient norm was non-finite (or DeepSpeed's -1)


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


def global_batch(build: Callable[[int], list[dict]], dp_rank: int, dp_size: int,
                 pin: bool = False) -> tuple[list[dict], float, int]:
    """This rank's micro-batches (`build(dp_rank)`), and the target tokens (at least 1, so an
    all-ignored batch divides safely) and samples fingerprint of the whole global batch, read
    from every data-parallel rank's micro-batches instead of all-reduced. `pin`: page-locked
    tensors, so the copies to a CUDA device run asynchronously."""
    mine, tokens, fingerprint = [], 0, 0
    for d in range(dp_size):
        batches = build(d)
        tokens += sum(int((b["labels"] != IGNORE).sum()) for b in batches)
        fingerprint += sum(b["fingerprint"] for b in batches)
        if d == dp_rank:
            mine = batches
    if pin:
        mine = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in mine]
    return mine, max(float(tokens), 1.0), fingerprint


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def cp_shard(batch: dict, cp) -> dict:
    """This context-parallel rank's block of positions of a micro-batch (input_ids, labels);
    the segment ids stay whole. Unchanged when cp is None."""
    if cp is None:
        return batch
    return {**batch, "input_ids": cp.shard(batch["input_ids"]).contiguous(),
            "labels": cp.shard(batch["labels"]).contiguous()}


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
    batches: list[dict]  # this rank's micro-batches
    tokens: float  # target tokens of the whole global batch (global_batch)
    fingerprint: int  # samples fingerprint of the whole global batch (global_batch)
    gas: int
    stop_flag: bool
    use_segments: bool
    # Fault injection (MEGACPT_FAULT=nan:PHASE:BATCH / nangrad:PHASE:BATCH): "nan" makes the batch's
    # loss and gradients NaN, "nangrad" its gradients only (the loss stays finite: only the norm shows it).
    poison: str = ""
    cp: object = None  # context parallelism: parallel/cp.py UlyssesAttention of this rank's group
    ahead: Callable[[], None] | None = None  # host work run while the device finishes the step


@dataclass
class StepSums:
    """The step's one all-reduced vector, read back: world sums of each rank's contribution."""
    loss: float
    nonfinite: bool
    stop: bool
    norm: float


def reduce_step(device, loss: torch.Tensor, loss_owner: bool, norm, norm_owner: bool, inputs: StepInputs) -> StepSums:
    """megacpt's one collective of a step: [loss, non-finite, stop, norm] summed over the world
    on the engine's device (NCCL on GPUs), then the step's one read back to the host.

    Each rank flags its own loss and norm (a norm below 0 is DeepSpeed's sentinel for inf/NaN);
    the loss and norm terms come only from the ranks that own them (`*_owner`: the others add
    0, which leaves a sum, inf and NaN unchanged), so values held by several ranks count once."""
    vec = torch.zeros(4, dtype=torch.float64, device=device)
    bad = ~torch.isfinite(loss)
    if loss_owner:
        vec[0] = loss
    vec[2] = float(inputs.stop_flag)
    if torch.is_tensor(norm):
        n = norm.detach().to(device=device, dtype=torch.float64)
        bad = bad | ~torch.isfinite(n) | (n < 0)
        if norm_owner:
            vec[3] = n
    elif norm is not None:
        bad = bad | (not math.isfinite(norm) or norm < 0)
        if norm_owner:
            vec[3] = float(norm)
    vec[1] = bad
    dist.all_reduce(vec)
    if inputs.ahead is not None:
        inputs.ahead()  # on GPUs the all-reduce above is only queued: this overlaps the device's work
    loss_sum, n_bad, stop, norm_sum = vec.tolist()
    return StepSums(loss_sum, n_bad > 0, stop > 0, norm_sum)


def train_step(engine, topo, zero_stage: int, inputs: StepInputs, where: dict) -> StepOut:
    """One optimizer step over this rank's micro-batches (the non-pipeline engine)."""
    device = engine.device
    # All copies queued before the first forward: from pinned memory they overlap the compute.
    batches = [to_device(cp_shard(b, inputs.cp), device) for b in inputs.batches]
    scale = topo.grad_size * inputs.gas / inputs.tokens
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    norm_sq = None
    for i, b in enumerate(batches):
        kwargs = {"segment_ids": b["segments"]} if inputs.use_segments else {}
        if "pool_index" in b:  # task: classify
            kwargs["pool_index"] = b["pool_index"]
        # Explicit, not DeepSpeed's micro-step counter modulo the accumulation steps: after a phase
        # changes them, the counter is no longer a multiple of the new value.
        engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
        if inputs.cp is not None:
            kwargs["cp"] = inputs.cp
        where["op"] = f"forward of micro-batch {i} (ZeRO parameter all-gather)"
        out = engine(b["input_ids"], labels=b["labels"], **kwargs)
        if inputs.poison == "nan":
            out = out * float("nan")
        where["op"] = f"backward of micro-batch {i} (gradient reduce-scatter)"
        engine.backward(out * scale if inputs.poison != "nangrad" else out * scale * float("nan"))
        if i == len(batches) - 1 and zero_stage == 0:
            # Without ZeRO, DeepSpeed clips but does not report the norm: measure the
            # (already data-parallel averaged) gradients before the optimizer step.
            norm_sq = tp_grad_sq(engine.module, topo)
        where["op"] = "optimizer step"
        engine.step()
        loss_sum += out.detach()
    where["op"] = "all-reduce of the step's loss, non-finite and stop flags"
    if norm_sq is not None:
        # Each model replica's partial squares (split parameters on every tp rank, the others on tp
        # rank 0): one replica (grad rank 0) adds them up to the whole model's.
        sums = reduce_step(device, loss_sum, topo.tp_rank == 0, norm_sq, topo.grad_rank == 0, inputs)
        norm = math.sqrt(sums.norm) if sums.norm >= 0 else sums.norm
    else:
        global_norm = engine.get_global_grad_norm()  # the same on every rank: world rank 0 reports it
        sums = reduce_step(device, loss_sum, topo.tp_rank == 0, global_norm, topo.rank == 0, inputs)
        norm = None if global_norm is None else sums.norm
    return StepOut(loss=sums.loss / inputs.tokens, grad_norm=norm, fingerprint=inputs.fingerprint,
                   stop_signal=sums.stop, nonfinite=sums.nonfinite)

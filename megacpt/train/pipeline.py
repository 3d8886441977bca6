"""The trainer's pipeline-parallel path (parallel.pp > 1): DeepSpeed's PipelineEngine (1F1B,
micro-batches = gradient accumulation steps) over the stages of megacpt.parallel.pp.

Built by megacpt.train.parallelize.build_pipeline; the loop calls `PipelineRun.train_step` /
`.evaluate` in place of its own step and evaluation; data order, token-mean loss, stop signals, metrics and
checkpoints stay the loop's.

Loss: the last stage's loss_fn returns the summed token loss of a micro-batch × dp·gas / T (T =
target tokens in the global batch, counted by every rank from the whole global batch: see
step.global_batch). DeepSpeed divides by gas and averages gradients and the reported loss over
dp, so both become exactly the token mean of the global batch, as in the non-pipeline path. The
step's bookkeeping is step.reduce_step's one all-reduce, as there.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, PipeModelDataParallelTopology

from megacpt.labels import IGNORE
from megacpt.parallel.pp import megacpt_name
from megacpt.train.engine import deep_merge
from megacpt.train.step import StepInputs, StepOut, reduce_step, to_device


def ds_config_for(ds_config: dict, zero_stage: int, dtype) -> tuple[dict, bool]:
    """The DeepSpeed config for the pipeline engine, and whether we clip ourselves.

    Activations are sent whole between stages (DeepSpeed's partitioning of them over the tp
    group is off: simpler, and tp ranks hold identical activations anyway). Without ZeRO in
    fp32, DeepSpeed clips but never reports the norm and the pipeline engine offers no point
    between the gradient all-reduce and the step to measure it, so we clip in an optimizer
    pre-step hook instead (the same rule: coef = min(1, clip / (norm + 1e-6)))."""
    own_clip = zero_stage == 0 and dtype == torch.float32
    extra = {"pipeline": {"pipe_partitioned": False, "grad_partitioned": False}}
    out = deep_merge(extra, ds_config)
    clip = float(out.get("gradient_clipping", 0.0))
    if own_clip:
        out["gradient_clipping"] = 0.0
    return out, (clip if own_clip else None)


def staged_pipeline(items, bounds, tied, topology, loss_fn):
    """DeepSpeed's PipelineModule over our already-built items, in our Topology's rank order
    (pipe, data, model with model fastest), with our stage boundaries and tied-embedding group."""
    t = topology
    ds_topo = (PipeModelDataParallelTopology(num_pp=t.pp_size, num_mp=t.tp_size, num_dp=t.dp_size) if t.tp_size > 1
               else PipeDataParallelTopology(num_pp=t.pp_size, num_dp=t.dp_size))
    return StagedPipeline(items, bounds, tied, t.embed_group, topology=ds_topo, loss_fn=loss_fn,
                          partition_method="uniform")


class StagedPipeline(PipelineModule):
    """PipelineModule with our stage boundaries and our tied-embedding group.

    DeepSpeed's own balancing counts parameters of modules it builds, and its TiedLayerSpec
    builds the tied module itself; our items are already built (and sliced by apply_tp), so
    we hand it the boundaries and the (weight, group) pair it all-reduces after backward."""

    def __init__(self, items, bounds, tied, tied_group, **kw):
        # Read by _partition_layers during PipelineModule.__init__, so set before it.
        object.__setattr__(self, "_megacpt_bounds", list(bounds))
        object.__setattr__(self, "_megacpt_tied", tied)
        object.__setattr__(self, "_megacpt_tied_group", tied_group)
        super().__init__(items, **kw)

    def _partition_layers(self, method="uniform"):
        self.parts = list(self._megacpt_bounds)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def _index_tied_modules(self):
        return {}

    def get_tied_weights_and_groups(self):
        if self._megacpt_tied is None:
            return []
        owner, attr = self._megacpt_tied
        return [(getattr(owner, attr), self._megacpt_tied_group)]

    def allreduce_tied_weight_gradients(self):
        for w, group in self.get_tied_weights_and_groups():
            if w.grad is not None:
                dist.all_reduce(w.grad, group=group)


def rename(pipe_name: str) -> str:
    return megacpt_name(pipe_name)


class PipelineRun:
    """Train and evaluate steps of the loop, run through the pipeline engine."""

    def __init__(self, engine, state, topology, own_clip: float | None):
        self.engine, self.state, self.topo = engine, state, topology
        self.norm = None
        self.own_clip = own_clip
        if own_clip is not None:
            opt = engine.optimizer
            if not hasattr(opt, "register_step_pre_hook"):
                raise RuntimeError(f"pipeline without ZeRO: cannot hook {type(opt).__name__} to clip gradients")
            opt.register_step_pre_hook(self._clip)

    @torch.no_grad()
    def _clip(self, optimizer, args, kwargs):
        # On the device (no host sync): the coefficient is exactly 1 where no clipping is due.
        self.norm = global_grad_norm(self.engine.module, self.topo)
        if self.own_clip > 0:
            coef = torch.clamp(self.own_clip / (self.norm + 1e-6), max=1.0)
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, coef)

    def train_step(self, inputs: StepInputs, where: dict) -> StepOut:
        t, engine = self.topo, self.engine
        poison = float("nan") if inputs.poison else 1.0  # "nangrad" too: the loss_fn scales loss and gradient alike
        self.state.loss_scale = t.dp_size * inputs.gas / inputs.tokens * poison
        self.state.use_segments = inputs.use_segments
        dev = engine.device
        data = []
        for b in inputs.batches:
            b = to_device(b, dev)
            data.append(((b["input_ids"], b["segments"]), b["labels"]))
        where["op"] = "pipeline batch (1F1B forward/backward, stage send/recv, gradient all-reduce, optimizer step)"
        self.norm = None
        loss = engine.train_batch(iter(data))
        where["op"] = "all-reduce of the step's loss, non-finite and stop flags"
        norm = self.norm if self.own_clip is not None else engine.get_global_grad_norm()
        # DeepSpeed's loss is already the dp mean, on every rank: world rank 0 reports it (and the norm).
        sums = reduce_step(dev, loss.detach().double(), t.rank == 0, norm, t.rank == 0, inputs)
        return StepOut(loss=sums.loss, grad_norm=None if norm is None else sums.norm, fingerprint=inputs.fingerprint,
                       stop_signal=sums.stop, nonfinite=sums.nonfinite)

    def evaluate(self, windows: np.ndarray, mb: int) -> tuple[float, int]:
        """Summed token loss and token count over all windows (split over dp like the plain path).
        Every micro-batch has exactly `mb` rows (padding rows fully ignored): the engine keeps
        the first shapes it sent between stages."""
        t, engine = self.topo, self.engine
        mine = windows[t.dp_rank::t.dp_size]
        per_rank = -(-len(windows) // t.dp_size)
        calls = -(-per_rank // mb)
        data, count = [], 0
        for c in range(calls):
            chunk = mine[c * mb:(c + 1) * mb]
            rows = torch.from_numpy(np.ascontiguousarray(chunk)) if len(chunk) else None
            full = torch.from_numpy(np.ascontiguousarray(windows[:1])).repeat(mb, 1)
            labels = full[:, 1:].clone().fill_(IGNORE)
            if rows is not None:
                full[: len(rows)] = rows
                labels[: len(rows)] = rows[:, 1:]
            count += int((labels != IGNORE).sum())
            ids = full[:, :-1].contiguous()
            data.append(((ids.to(engine.device), torch.zeros_like(ids).to(engine.device)), labels.to(engine.device)))
        total = torch.zeros(2, dtype=torch.float64)
        if calls:
            self.state.loss_scale, self.state.use_segments = 1.0, False
            out = engine.eval_batch(iter(data), compute_loss=True, reduce_output=None, bcast_loss=False,
                                    num_micro_batches=calls)
            if engine.is_last_stage():
                total[0] = float(sum(o.double().cpu() for o in out))
            # The loss lives on the last stage; every stage reports it.
            buf = total[:1].to(engine.device)
            dist.broadcast(buf, src=t.pp_ranks[-1], group=t.pp_group)
            total[0] = buf.cpu()[0]
        total[1] = count
        dist.all_reduce(total, group=t.dp_group)
        return float(total[0]), int(total[1])


@torch.no_grad()
def global_grad_norm(module, topology) -> torch.Tensor:
    """L2 norm of all gradients of the model, each parameter counted once over tp × pp
    (flags from megacpt.parallel.pp.mark_norm_counting)."""
    device = next((p.grad.device for p in module.parameters() if p.grad is not None), torch.device("cpu"))
    grads = [p.grad for p in module.parameters() if p.grad is not None and getattr(p, "megacpt_counted", True)]
    sq = (torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).square().sum() if grads
          else torch.zeros((), dtype=torch.float64, device=device))
    if topology.mp_group is not None:
        dist.all_reduce(sq, group=topology.mp_group)
    return sq.sqrt()

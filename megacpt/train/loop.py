"""The training run: a short driver over named pieces.

    resolve the start (resume.py) → describe the run: model shape, layout, data (all checked
    before any process group starts, so bad input exits 2 with nothing half-made) → start the
    ranks → build (parallelize.py) → restore a resume → the step loop (step.py; evaluate.py,
    rollback.py, checkpoints) → teardown.

Construction is kept apart from the loop, as in torchtitan's Trainer. The pieces share one
RunState (state.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from megacpt.config import DROPOUT_LAYOUTS, Config, derive
from megacpt.data import classify as classify_data
from megacpt.data import sft as sft_data
from megacpt.errors import ConfigError
from megacpt.models import lora
from megacpt.models.hf import apply_overrides, args_from_hf_config, hf_config_for
from megacpt.parallel import Topology, validate_layout
from megacpt.parallel.shapes import param_shapes
from megacpt.train import checkpoint as ckpt
from megacpt.train.async_save import AsyncSaver
from megacpt.train import classify
from megacpt.train import dist as mdist
from megacpt.train import step as step_mod
from megacpt.train import task_eval
from megacpt.train.cpu_alloc import use_caching_malloc
from megacpt.train.engine import deepspeed_config, resolve_precision
from megacpt.train.evaluate import (evaluate_base, evaluate_now, latest_perplexities, latest_task_metrics,
                                    summary_table, valid_windows)
from megacpt.train.float8 import check_float8
from megacpt.train.metrics import (MetricsLogger, device_name, format_console, model_state_record, peak_flops,
                                   peak_memory_mb, throughput)
from megacpt.train.parallelize import BuildSpec, build_model, build_pipeline, context_parallel, initialize
from megacpt.train.phases import (build_datasets, consumed_samples, data_batch_index, lr_for, phase_at, plan_phases,
                                  tokens_per_source)
from megacpt.train.pipeline import PipelineRun, ds_config_for, rename
from megacpt.train.resume import check_layout_change, plan_layout_change, resolve_start, restore
from megacpt.train.rollback import is_finite, roll_back
from megacpt.train.stages import Stages, freeze, frozen_names, needs_embedding_group
from megacpt.train.stages import param_groups as stage_groups
from megacpt.train.state import RunState, Start
from megacpt.train.step import StepInputs, StepOut


class StopSignal:
    """SIGUSR1/SIGTERM set a flag; ranks agree on it through a collective every step."""

    def __init__(self):
        self.flag = False
        self.name = None
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGUSR1, signal.SIGTERM)}

    def _handler(self, signum, frame):
        self.flag = True
        self.name = signal.Signals(signum).name

    def restore(self) -> None:
        """The handlers from before: a process that called train() (tests, notebooks) stays killable."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg: Config) -> int:
    # Handlers first: a USR1/TERM during start-up (minutes on big models) becomes a clean stop
    # after the first step instead of killing the ranks.
    stopper = StopSignal()
    try:
        return train_with(cfg, stopper)
    finally:
        stopper.restore()


def train_with(cfg: Config, stopper: StopSignal) -> int:
    info = mdist.discover()
    # Before anything large is allocated: blocks mmapped earlier would keep being returned.
    caching_malloc = (cfg.train.cpu_allocator == "caching" and not torch.cuda.is_available()
                      and use_caching_malloc())
    derived = derive(cfg, info.world_size)
    if cfg.precision == "fp8":
        check_float8()
    start = resolve_start(cfg, info.world_size)
    if start.finished:
        if info.rank == 0:
            stopped_at = start.state["early_stopping"]["stopped_at"]
            print(f"{start.resume_dir} stopped early at step {stopped_at}; nothing to do (use a new run_dir to "
                  f"train on)", flush=True)
        return 0
    rs = describe_run(cfg, derived, start, info.world_size)
    task_eval.prepare(rs)
    if info.rank == 0:
        for line in task_eval.overlap_warnings(rs):
            print(f"warning: {line}", flush=True)
    rs.stopper, rs.caching_malloc = stopper, caching_malloc
    mdist.init(timeout_s=cfg.train.collective_timeout_s)
    build(rs)
    restore(rs, rename=rename if rs.pipe_run else None)
    open_outputs(rs)
    try:
        run_steps(rs)
        finish(rs)
    except BaseException:
        if rs.saver is not None:  # the save in flight: finished, or left unpublished
            rs.saver.abandon()
        raise
    return 0


def describe_run(cfg: Config, derived, start: Start, world: int) -> RunState:
    """The model's shape, the layout and the data, checked before any rank starts."""
    args = args_from_hf_config(start.base_cfg, source=str(cfg.model.init_from or start.resume_dir))
    args = apply_overrides(args, cfg.model.max_seq_len, cfg.model.rope_theta, cfg.model.rope_scaling,
                           cfg.model.local_rope_theta)
    args = with_dropout(cfg, args)
    rs = RunState(cfg=cfg, derived=derived, start=start, args=args, hf_cfg=hf_config_for(args, start.base_cfg))
    if cfg.adapter is not None:
        rs.adapter = lora.resolve(cfg.adapter, args, start.base_cfg, cfg.seed)
    validate_layout(args, world, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage, cfg.parallel.cp)
    check_layout_change(start, cfg, world)
    if cfg.train.freeze:
        names = list(param_shapes(args)) + (["lm_head.weight"] if args.tie_word_embeddings else [])
        frozen_names(names, cfg.train.freeze, args.num_layers)
    rs.phases = plan_phases(cfg)
    for p in rs.phases:
        if p.seq_len > args.max_position_embeddings:
            what = "data.seq_len" if p.name == "main" else f"phase {p.name}: seq_len"
            raise ConfigError(
                f"{what} {p.seq_len} exceeds the model's max_position_embeddings {args.max_position_embeddings}; "
                f"set model.max_seq_len (and rope_theta/rope_scaling) to extend it")
    if rs.sft:
        rs.tokenizer, rs.valid, rs.sft_cut = sft_data.build(cfg, rs.phases, args.vocab_size, start.source_dir)
        return rs
    if rs.classify:
        classify.prepare(rs)
        return rs
    build_datasets(cfg, rs.phases, args.vocab_size)
    for v in cfg.data.valid:
        seq_len = v.seq_len or cfg.data.seq_len
        if seq_len > args.max_position_embeddings:
            raise ConfigError(f"data.valid {v.name}: seq_len {seq_len} exceeds the model's max_position_embeddings "
                              f"{args.max_position_embeddings}; lower it, or extend the model (model.max_seq_len)")
        rs.valid[v.name] = valid_windows(cfg, v, seq_len, args.vocab_size)
    return rs


def with_dropout(cfg: Config, args):
    if cfg.model.dropout is not None:
        args = dataclasses.replace(args, attention_dropout=cfg.model.dropout, residual_dropout=cfg.model.dropout)
    par = cfg.parallel
    if (args.attention_dropout or args.residual_dropout) and max(par.tp, par.pp, par.cp) > 1:
        raise ConfigError(f"the model's config asks for dropout (attention {args.attention_dropout}, residual "
                          f"{args.residual_dropout}): {DROPOUT_LAYOUTS}")
    return args


def build(rs: RunState) -> None:
    """Process groups, seeds, the DeepSpeed config, then the model and engine (parallelize.py)."""
    cfg = rs.cfg
    rs.topo = Topology.from_dist(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp)
    rs.rank, rs.world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed + rs.rank)
    np.random.seed((cfg.seed + rs.rank) % 2**32)
    rs.dtype = resolve_precision(cfg.precision)
    rs.ds_config = deepspeed_config(cfg, rs.derived, rs.dtype)
    if rs.rank == 0:
        ckpt.clean_partial(rs.ckpt_root)
    plan_layout_change(rs)
    spec = BuildSpec(args=rs.args, dtype=rs.dtype, zero_stage=cfg.parallel.zero_stage,
                     sequence_parallel=cfg.parallel.sequence_parallel,
                     activation_checkpointing=cfg.model.activation_checkpointing, compile=cfg.model.compile,
                     pp_balance=cfg.parallel.pp_balance, seed=cfg.seed, adapter=rs.adapter,
                     float8=cfg.precision == "fp8")
    if rs.topo.pp_size > 1:
        rs.ds_config, own_clip = ds_config_for(rs.ds_config, cfg.parallel.zero_stage, rs.dtype)
        model, pipe_state = build_pipeline(spec, rs.topo, rs.start.weights)
    else:
        model = build_model(spec, rs.topo, rs.start.weights, rs.ds_config, say=rs.say)
        rs.cp = context_parallel(rs.args, rs.topo)
    # A classifier never uses an untied LM head: no gradient, no optimizer state for it.
    head = ["lm_head.weight"] if rs.classify and not rs.args.tie_word_embeddings else []
    n_frozen = freeze(model, list(cfg.train.freeze) + head)
    if n_frozen:
        rs.say(f"frozen: {n_frozen:,} parameters (no gradients, no optimizer state)")
    groups, kinds = stage_groups(model, cfg.optim.weight_decay, needs_embedding_group(cfg), cfg.optim.layer_lr_decay)
    rs.stages = Stages(model, kinds, cfg.optim.lr, cfg.optim.embedding_lr)
    rs.group_decay = [g["weight_decay"] for g in groups]
    rs.engine = initialize(model, groups, rs.ds_config, rs.topo, say=rs.say)
    if rs.topo.pp_size > 1:
        rs.pipe_run = PipelineRun(rs.engine, pipe_state, rs.topo, own_clip)
    if cfg.checkpoint.async_:
        rs.saver = AsyncSaver(rs.engine, rs.rank, rs.world, say=rs.say)
    if rs.task_eval is not None:
        task_eval.attach(rs)
    mdist.release_shm_names(rs.rank)


def open_outputs(rs: RunState) -> None:
    """metrics.jsonl / TensorBoard, layout.json, config.resolved.json, the progress bar."""
    cfg = rs.cfg
    rs.logger = MetricsLogger(rs.run_dir, enabled=rs.rank == 0, cfg=cfg)
    rs.peak_flops = peak_flops(device_name())
    write_layout(rs)
    if rs.rank == 0:
        with open(rs.run_dir / "config.resolved.json", "w") as f:
            json.dump({"config": cfg.to_dict(), "deepspeed": rs.ds_config, "world_size": rs.world,
                       "model": rs.args.to_dict(), "caching_malloc": rs.caching_malloc}, f, indent=2)
    if rs.sft and rs.sft_cut:
        rs.say(f"note: {rs.sft_cut} SFT examples are longer than data.seq_len+1 = {cfg.data.seq_len + 1} tokens "
               f"and were cut")
    if rs.rank == 0 and sys.stderr.isatty():
        rs.bar = tqdm(total=rs.total_steps, initial=rs.step, unit="step", dynamic_ncols=True)


def run_steps(rs: RunState) -> None:
    """The step loop: one optimizer step, then logging, evaluation, the stop decision and
    checkpoints; a non-finite step rolls back instead."""
    cfg = rs.cfg
    measured = rs.base_valid or rs.base_tasks
    if (rs.valid or rs.task_eval) and rs.step == 0 and cfg.train.eval_at_start and not measured:
        evaluate_base(rs)
    rs.engine.train()
    while rs.step < rs.total_steps:
        phase = phase_at(rs.phases, rs.step)
        t0 = time.perf_counter()
        batch_index = data_batch_index(rs.step - phase.start, rs.skips.get(phase.name, []))
        lr = lr_for(rs.phases, rs.step)
        lr_log = rs.stages.apply(rs.engine.optimizer, lr, phase.trainable)
        out = one_step(rs, phase, batch_index)
        if not is_finite(out):
            roll_back(rs, out, phase.name, batch_index)
            continue
        rs.step += 1
        rs.steps_this_run += 1
        log_step(rs, phase.name, out, {"lr": lr, **lr_log}, time.perf_counter() - t0)
        if after_step(rs, out):
            break


def one_step(rs: RunState, phase, batch_index: int) -> StepOut:
    cfg, topo = rs.cfg, rs.topo
    G, mb = phase.global_batch, phase.micro_batch
    gas = G // (mb * topo.dp_size)
    if rs.pipe_run is None:
        step_mod.set_batch_shape(rs.engine, mb, gas)
    batches, tokens, fingerprint = step_batches(rs, phase, batch_index)
    fault = os.environ.get("MEGACPT_FAULT", "")
    poison = next((k for k in ("nan", "nangrad") if fault == f"{k}:{phase.name}:{batch_index}"), "")
    inputs = StepInputs(batches, tokens, fingerprint, gas, rs.stopper.flag, use_segments=cfg.data.document_mask or rs.sft,
                        poison=poison, cp=rs.cp, ahead=lambda: build_ahead(rs))
    try:
        if rs.pipe_run is not None:
            return rs.pipe_run.train_step(inputs, rs.where)
        return step_mod.train_step(rs.engine, topo, cfg.parallel.zero_stage, inputs, rs.where)
    except RuntimeError as e:
        raise collective_error(e, rs.rank, rs.step + 1, rs.where) from e


def step_batches(rs: RunState, phase, batch_index: int) -> tuple[list[dict], float, int]:
    """This rank's micro-batches of a data batch, and the target tokens and fingerprint of the
    whole global batch (step.global_batch); built during the previous step when it guessed right."""
    ahead, rs.ahead = rs.ahead, None
    if ahead is not None and ahead[0] == (phase.name, batch_index):
        return ahead[1]
    topo, G, mb = rs.topo, phase.global_batch, phase.micro_batch
    gas, first = G // (mb * topo.dp_size), batch_index * G
    if rs.sft:
        def build(d):
            return sft_data.rank_batches(phase.dataset, first, mb, gas, d, topo.dp_size)
    elif rs.classify:
        def build(d):
            return classify_data.rank_batches(phase.dataset, first, mb, gas, d, topo.dp_size)
    else:
        def build(d):
            return step_mod.rank_batches(phase.dataset, first, mb, gas, d, topo.dp_size, rs.cfg.data.mask_eos_loss)
    pin = torch.device(rs.engine.device).type == "cuda"
    return step_mod.global_batch(build, topo.dp_rank, topo.dp_size, pin=pin)


def build_ahead(rs: RunState) -> None:
    """The next step's batches, built while the device finishes this step: guessed as if this
    step is finite (after a rollback the next step reads another batch and builds its own)."""
    nxt = rs.step + 1
    if nxt >= rs.total_steps:
        return
    phase = phase_at(rs.phases, nxt)
    index = data_batch_index(nxt - phase.start, rs.skips.get(phase.name, []))
    rs.ahead = ((phase.name, index), step_batches(rs, phase, index))


def log_step(rs: RunState, phase_name: str, out: StepOut, lrs: dict, dt: float) -> None:
    cfg, step = rs.cfg, rs.step
    factor = cfg.train.spike_factor
    if factor and len(rs.recent) >= 10 and out.loss > factor * statistics.median(rs.recent):
        median = statistics.median(rs.recent)
        rs.logger.log({"step": step, "event": "loss_spike", "loss": out.loss, "median": median})
        rs.say(f"warning: loss spike at step {step}: {out.loss:.4f} > {factor} × median "
               f"{median:.4f} of the last {len(rs.recent)} steps")
    rs.recent.append(out.loss)
    if rs.rank == 0 and rs.steps_this_run == 1:
        rs.logger.log({"step": step, **model_state_record(rs.engine)})
    if rs.rank == 0 and (step % cfg.train.log_interval == 0 or step == rs.total_steps):
        phase = phase_at(rs.phases, step - 1)
        G, S = phase.global_batch, phase.seq_len
        rec = {"step": step, "phase": phase_name, "loss": out.loss, "lr": lrs.pop("lr"), "grad_norm": out.grad_norm,
               "step_time_s": dt, "peak_memory_mb": peak_memory_mb(),
               "consumed_samples": consumed_samples(rs.phases, step), "samples_fingerprint": out.fingerprint % 2**48,
               **lrs}
        if len(rs.phases) > 1:
            rec["seq_len"] = S
        if cfg.precision == "fp8":  # its numerics differ; its MFU is still against the dense bf16 peak
            rec["precision"] = "fp8"
        # FLOPs per token follow the phase's sequence length (attention grows with it).
        rec.update(throughput(G * S, dt, rs.world, rs.args.flops_per_token(S), rs.peak_flops))
        for name, n in tokens_per_source(rs.phases, step, rs.skips).items():
            rec[f"tokens/{name}"] = n
        rs.logger.log(rec)
        if rs.bar is not None:
            rs.bar.set_postfix(loss=f"{out.loss:.4f}", lr=f"{rec['lr']:.2e}")
        else:
            print(format_console(rec), flush=True)
    if rs.bar is not None:
        rs.bar.update(1)


def after_step(rs: RunState, out: StepOut) -> bool:
    """Evaluate and checkpoint when due; True when the run stops here (early stop, signal,
    train.stop_after), after a checkpoint."""
    cfg, step = rs.cfg, rs.step
    early = None
    valid_due = bool(rs.valid) and (step % cfg.train.eval_interval == 0 or step == rs.total_steps)
    tasks_due = task_eval.due(rs, step)
    if valid_due or tasks_due:
        early = evaluate_now(rs, valid_due, tasks_due)
    if early:
        rs.stopped_by = early
    elif out.stop_signal:
        rs.stopped_by = rs.stopper.name or "signal"
    elif cfg.train.stop_after is not None and rs.steps_this_run >= cfg.train.stop_after and step < rs.total_steps:
        rs.stopped_by = "train.stop_after"
    if step % cfg.checkpoint.interval == 0 or (step == rs.total_steps and cfg.checkpoint.final) or rs.stopped_by:
        save(rs)
    return rs.stopped_by is not None


def save(rs: RunState) -> None:
    cfg, step = rs.cfg, rs.step
    st = {
        "step": step,
        "phase": phase_at(rs.phases, min(step, rs.total_steps - 1)).name,
        "consumed_samples": consumed_samples(rs.phases, step),
        "tokens_per_source": tokens_per_source(rs.phases, step, rs.skips),
        "skipped_batches": rs.skips,
        "base_valid": rs.base_valid,
        "base_tasks": rs.base_tasks,
        "base_tasks_settings": task_eval.settings(rs) if rs.base_tasks else None,
        "early_stopping": rs.early_stopper.state() if rs.early_stopper else None,
        "config": cfg.to_dict(),
        "world_size": rs.world,
        "source_dir": str(rs.start.source_dir) if rs.start.source_dir else None,
    }
    t0 = time.perf_counter()
    if rs.saver is None:
        path = ckpt.save(rs.engine, rs.ckpt_root, step, st, rs.hf_cfg, cfg.checkpoint.keep, rs.rank)
    else:
        path = rs.saver.save(rs.engine, rs.ckpt_root, step, st, rs.hf_cfg, cfg.checkpoint.keep)
    # How long the training loop stood still for it (an async save: a wait for the previous
    # one, if still in flight, and the snapshot).
    rs.logger.log({"step": step, "event": "checkpoint", "blocked_s": time.perf_counter() - t0,
                   "async": rs.saver is not None})
    rs.last_saved = step
    rs.say(f"checkpoint saved: {path}" if rs.saver is None else f"checkpoint {path.name}: writing in the background")


def finish(rs: RunState) -> None:
    """The last checkpoint (unless just written), the summary, and teardown."""
    cfg, step = rs.cfg, rs.step
    if rs.last_saved != step and (cfg.checkpoint.final or step < rs.total_steps):
        save(rs)
    if rs.saver is not None:
        rs.saver.wait()
    if rs.bar is not None:
        rs.bar.close()
    if rs.rank == 0:
        if rs.early_stopper is not None and rs.early_stopper.stopped_at is not None:
            print(f"stopped at step {step}/{rs.total_steps} ({rs.stopped_by}); checkpoint written", flush=True)
        elif rs.stopped_by:
            print(f"stopped at step {step}/{rs.total_steps} ({rs.stopped_by}); checkpoint written, rerun to resume",
                  flush=True)
        elif rs.base_valid or rs.base_tasks:
            print(summary_table(rs.base_valid, latest_perplexities(rs.run_dir), rs.base_tasks,
                                latest_task_metrics(rs.run_dir)), flush=True)
    rs.logger.close()
    dist.barrier()
    dist.destroy_process_group()


def collective_error(e: RuntimeError, rank: int, step: int, where: dict) -> RuntimeError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    low = msg.lower()
    if any(w in low for w in ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")):
        return RuntimeError(f"rank {rank}: collective failed at step {step} during {where['op']}: {msg} — another "
                            f"rank stopped participating or died (see its log); rerun to resume from the last checkpoint")
    return e


def write_layout(rs: RunState) -> None:
    """run_dir/layout.json: how many elements of each parameter every rank holds (shows sharding:
    ZeRO partitions, tensor-parallel slices, pipeline stages — 0 where a rank has none of it)."""
    mine = {}
    for name, p in rs.engine.module.named_parameters():
        full = int(getattr(p, "ds_numel", p.numel()))
        local = int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else int(p.numel())
        mine[rename(name) if rs.pipe_run else name] = (full, local)
    every = [None] * rs.world
    dist.all_gather_object(every, mine)
    if rs.rank != 0:
        return
    names: dict = {}
    for held in every:
        for n, (full, _) in held.items():
            names.setdefault(n, full)
    layout = {
        "world_size": rs.world,
        "zero_stage": rs.cfg.parallel.zero_stage,
        "params": {n: {"numel": f, "per_rank": [held.get(n, (0, 0))[1] for held in every]} for n, f in names.items()},
        "per_rank_total": [sum(v[1] for v in held.values()) for held in every],
        "total": sum(names.values()),
        "ranks": [rs.topo.layout.named_coords(r) for r in range(rs.world)],
    }
    with open(rs.run_dir / "layout.json", "w") as fh:
        json.dump(layout, fh, indent=1)

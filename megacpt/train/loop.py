"""The training run: validate everything, start ranks, build, resume, train, evaluate, checkpoint.

All input checks (config, model dir, data, layout) happen before the process group starts and
before anything is written, so bad input exits 2 with nothing half-made.

Data position: the run is a sequence of phases (the implicit `main` phase of train.steps on
data.train, then the declared `phases`). Global batch k of a phase is that phase's samples
[k·G, (k+1)·G), split over data-parallel ranks by micro-batch; the resume point is just
(global step), from which the phase and its consumed samples follow, whatever the world size.
"""

from __future__ import annotations

import collections
import json
import math
import os
import signal
import statistics
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megacpt.config import Config, ScheduleConfig, TrainSource, derive, load_config, run_changing_diff
from megacpt.errors import ConfigError, UserError
from megacpt.train import checkpoint as ckpt

IGNORE = -100


@dataclass
class Phase:
    name: str
    start: int  # first global step
    steps: int
    sources: list[TrainSource]
    schedule: ScheduleConfig
    lr: float
    min_lr: float
    seed: int
    trainable: str = "all"  # all | embeddings
    dataset: object = None


def plan_phases(cfg: Config) -> list[Phase]:
    import hashlib

    phases = [Phase("main", 0, cfg.train.steps, list(cfg.data.train), cfg.schedule, cfg.optim.lr,
                    cfg.optim.min_lr, cfg.seed, cfg.train.trainable)]
    for p in cfg.phases:
        prev = phases[-1]
        sources = list(p.data.train) if p.data and p.data.train else prev.sources
        # Each phase has its own order: a pure function of (phase config, seed).
        seed = int.from_bytes(hashlib.sha256(f"{cfg.seed}/{p.name}".encode()).digest()[:4], "little")
        phases.append(Phase(p.name, prev.start + prev.steps, p.steps, sources, p.schedule or cfg.schedule,
                            p.lr if p.lr is not None else cfg.optim.lr,
                            p.min_lr if p.min_lr is not None else cfg.optim.min_lr, seed,
                            p.trainable or cfg.train.trainable))
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    for p in phases:
        if step < p.start + p.steps:
            return p
    return phases[-1]


def build_datasets(cfg: Config, phases: list[Phase], vocab_size: int) -> None:
    from megacpt.data.dataset import BlendedDataset, Source

    if not cfg.data.train:
        raise ConfigError("data.train is empty: add at least one {name, path, weight} source")
    G = cfg.train.global_batch_size
    for p in phases:
        srcs = [Source(s.name, s.path, s.weight) for s in p.sources]
        # Room for batches skipped after non-finite rollbacks (samples are prefix-stable).
        n = (p.steps + cfg.train.max_rollbacks) * G
        p.dataset = BlendedDataset(srcs, cfg.data.seq_len, p.seed, n, vocab_size=vocab_size)


def lr_for(phases: list[Phase], step: int) -> float:
    from megacpt.train.schedule import lr_at

    p = phase_at(phases, step)
    s = p.schedule
    return lr_at(step - p.start, p.steps, kind=s.kind, lr=p.lr, min_lr=p.min_lr, warmup_steps=s.warmup_steps,
                 decay_fraction=s.decay_fraction, decay_shape=s.decay_shape)


def tokens_per_source(phases: list[Phase], step: int, G: int, skips: dict | None = None) -> dict:
    """Tokens drawn from each source up to `step` (skipped batches included: they were read)."""
    out: dict = {}
    for p in phases:
        k = min(max(step - p.start, 0), p.steps)
        skipped = (skips or {}).get(p.name, [])
        done = (data_batch_index(k - 1, skipped) + 1) * G if k > 0 else 0
        for name, n in p.dataset.tokens_per_source(done).items():
            out[name] = out.get(name, 0) + n
    return out


def check_resume_compatible(old: dict, new: Config) -> None:
    from megacpt.config import config_from_dict
    from megacpt.train.stages import needs_embedding_group

    try:
        # Through today's schema: keys added since the checkpoint was written take their defaults.
        old_cfg = config_from_dict(old)
        old = old_cfg.to_dict()
    except ConfigError:
        old_cfg = None
    if old_cfg is not None and needs_embedding_group(old_cfg) != needs_embedding_group(new):
        raise ConfigError("the optimizer's parameter groups would change (an embedding group comes with "
                          "optim.embedding_lr or a trainable: embeddings phase): set them from the run's start, "
                          "or use a new run_dir with model.init_from pointing at this run")
    new_d = new.to_dict()
    diffs = run_changing_diff(old, new_d)
    old_ph, new_ph = old.get("phases", []), new_d.get("phases", [])
    if new_ph[: len(old_ph)] != old_ph:
        diffs.append("phases (existing phases changed; only appending new phases is allowed)")
    if diffs:
        raise ConfigError(
            "config differs from the checkpoint's in keys that change the run: "
            + ", ".join(diffs)
            + "; restore them, declare a new phase, or use a new run_dir"
        )


class StopSignal:
    """SIGUSR1/SIGTERM set a flag; ranks agree on it through a collective every step."""

    def __init__(self):
        self.flag = False
        self.name = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.flag = True
        self.name = signal.Signals(signum).name


def run(config_path, overrides: list[str]) -> int:
    cfg = load_config(config_path, overrides)
    return train(cfg)


def train(cfg: Config) -> int:
    import torch

    from megacpt.eval.perplexity import eval_windows
    from megacpt.models.hf import apply_overrides, args_from_hf_config, hf_config_for, read_hf_config
    from megacpt.train import dist as mdist

    info = mdist.discover()
    # Handlers first: a USR1/TERM during start-up (minutes on big models) becomes a clean stop
    # after the first step instead of killing the ranks.
    stopper = StopSignal()
    # Before anything large is allocated: blocks mmapped earlier would keep being returned.
    caching_malloc = False
    if cfg.train.cpu_allocator == "caching" and not torch.cuda.is_available():
        from megacpt.train.cpu_alloc import use_caching_malloc

        caching_malloc = use_caching_malloc()
    derived = derive(cfg, info.world_size)
    run_dir = Path(cfg.run_dir)
    ckpt_root = run_dir / "checkpoints"

    # ---- what we start from -------------------------------------------------------------------
    resume_dir = ckpt.latest_checkpoint(ckpt_root) if ckpt_root.is_dir() else None
    weights = None  # what this rank loads its parameters from (an HF dir or a checkpoint's tensors)
    init_ckpt = None
    if resume_dir is not None:
        state = ckpt.read_state(resume_dir)
        check_resume_compatible(state["config"], cfg)
        stopped_at = (state.get("early_stopping") or {}).get("stopped_at")
        if stopped_at is not None:
            if info.rank == 0:
                print(f"{resume_dir} stopped early at step {stopped_at}; nothing to do (use a new run_dir to "
                      f"train on)", flush=True)
            return 0
        base_cfg = json.loads((resume_dir / ckpt.HF_CONFIG_FILE).read_text())
        source_dir = state.get("source_dir")
    else:
        state = None
        if not cfg.model.init_from:
            raise ConfigError("model.init_from is not set: point it at a Hugging Face model dir or a megacpt checkpoint")
        init_ckpt = ckpt.resolve_checkpoint(cfg.model.init_from)
        if init_ckpt is not None:
            from megacpt.train.consolidate import checkpoint_weights

            base_cfg = json.loads((init_ckpt / ckpt.HF_CONFIG_FILE).read_text())
            source_dir = ckpt.read_state(init_ckpt).get("source_dir")
            weights = checkpoint_weights(init_ckpt)
        else:
            base_cfg = read_hf_config(cfg.model.init_from)
            weights = source_dir = cfg.model.init_from
    args = args_from_hf_config(base_cfg, source=str(cfg.model.init_from or resume_dir))
    args = apply_overrides(args, cfg.model.max_seq_len, cfg.model.rope_theta, cfg.model.rope_scaling)
    if cfg.data.seq_len > args.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len {cfg.data.seq_len} exceeds the model's max_position_embeddings "
            f"{args.max_position_embeddings}; set model.max_seq_len (and rope_theta/rope_scaling) to extend it"
        )
    hf_cfg = hf_config_for(args, base_cfg)
    from megacpt.parallel import validate_layout

    validate_layout(args, info.world_size, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage)
    relayout = resume_dir is not None and _layout_changed(state, cfg, info.world_size)
    if relayout and int(state["config"].get("parallel", {}).get("zero_stage", 0)) >= 3:
        raise ConfigError(f"resuming a ZeRO-3 run in another layout (tp/pp, or world size with tp/pp > 1) is not "
                          f"supported; relaunch with its own layout ({_layout_of(state)}), or start a new run_dir "
                          f"with model.init_from pointing at this run")
    if relayout:
        _check_relayout_supported(state["config"], cfg, _layout_of(state))

    # ---- data (validated before anything starts) ------------------------------------------------
    phases = plan_phases(cfg)
    total_steps = phases[-1].start + phases[-1].steps
    valid = {}
    sft = cfg.task == "sft"
    if sft:
        from megacpt.data import sft as sft_data

        tokenizer, valid, sft_cut = sft_data.build(cfg, phases, args.vocab_size, source_dir)
    else:
        build_datasets(cfg, phases, args.vocab_size)
    for v in [] if sft else cfg.data.valid:
        w = eval_windows(v.path, cfg.data.seq_len, cfg.data.valid_tokens)
        if w.max() >= args.vocab_size:
            raise UserError(f"data.valid {v.name}: token id {int(w.max())} ≥ model vocab {args.vocab_size}; "
                            f"re-run megacpt prepare with the model's tokenizer")
        valid[v.name] = w

    # ---- ranks and engine -------------------------------------------------------------------
    import deepspeed
    import torch.distributed as dist

    from megacpt.train.engine import build_model, deepspeed_config, mpu_for, resolve_precision
    from megacpt.train.metrics import MetricsLogger, device_name, format_console, peak_flops, peak_memory_mb, throughput

    mdist.init(timeout_s=cfg.train.collective_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    from megacpt.parallel import Topology

    topo = Topology.from_dist(cfg.parallel.tp, cfg.parallel.pp)
    dp_rank, dp_size, dp_group = topo.dp_rank, topo.dp_size, topo.dp_group
    torch.manual_seed(cfg.seed + rank)
    np.random.seed((cfg.seed + rank) % 2**32)
    dtype = resolve_precision(cfg.precision)
    ds_config = deepspeed_config(cfg, derived, dtype)
    if rank == 0:
        ckpt.clean_partial(ckpt_root)
    load_tag = resume_dir.name if resume_dir is not None else None
    moments = None
    # The step of a resume that changed the layout (re-sliced or universal): checkpoints up to it
    # are in the old layout, so a rollback must not load them into this engine.
    layout_changed_at = int(state["step"]) if relayout else None
    if relayout:
        from megacpt.models.hf import StateDictWeights
        from megacpt.train.relayout import read_layout_free

        full, adam_step = read_layout_free(resume_dir, args, state["config"].get("parallel", {}))
        weights = StateDictWeights({n: v["fp32"] for n, v in full.items()})
        moments = (full, adam_step)
        if rank == 0:
            print(f"re-laying out checkpoint {_layout_of(state)} as tp={cfg.parallel.tp} pp={cfg.parallel.pp} "
                  f"on {world} ranks (weights and Adam moments re-sliced)", flush=True)
    elif resume_dir is not None and int(state.get("world_size", world)) != world and cfg.parallel.zero_stage > 0:
        # ZeRO partitions depend on the data-parallel size: reshard through DeepSpeed's
        # universal checkpoint (converted once, next to the original, by rank 0).
        if rank == 0:
            ckpt.make_universal(resume_dir)
        dist.barrier()
        ds_config = dict(ds_config, checkpoint={"load_universal": True})
        load_tag = f"{resume_dir.name}/{ckpt.UNIVERSAL}"
        layout_changed_at = int(state["step"])
        if rank == 0:
            print(f"resharding checkpoint from {state['world_size']} to {world} ranks (universal checkpoint)", flush=True)
    pipe_run = None
    if topo.pp_size > 1:
        from megacpt.train import pipeline

        ds_config, own_clip = pipeline.ds_config_for(ds_config, cfg.parallel.zero_stage, dtype)
        model, pipe_state = pipeline.build(args, topo, weights=weights, seed=cfg.seed, dtype=dtype,
                                           balance=cfg.parallel.pp_balance,
                                           activation_checkpointing=cfg.model.activation_checkpointing)
    else:
        model = build_model(args, ds_config, dtype, cfg.parallel.zero_stage, weights=weights, topology=topo,
                            seed=cfg.seed, sequence_parallel=cfg.parallel.sequence_parallel)
        model.activation_checkpointing = cfg.model.activation_checkpointing
        if cfg.model.compile and cfg.parallel.zero_stage == 3:
            # ZeRO-3 gathers each linear's weight in a hook on its module, which would break a
            # compiled block around every linear: compile what lies between the linears instead.
            from megacpt.kernels.linear_cross_entropy import cpu_has_bf16_units
            from megacpt.models.llama import LMHead, compile_pointwise, cpu_attention

            # megacpt's CPU attention backward only where it measured faster than torch's: bf16 on
            # a CPU with bf16 units, with freed blocks kept by malloc (kernels/cpu_attention.py).
            # The loss head's compiled pass needs the first two as well (linear_cross_entropy).
            bf16_cpu = dtype == torch.bfloat16 and not torch.cuda.is_available() and cpu_has_bf16_units()
            attention = bf16_cpu and cfg.train.cpu_allocator == "caching"
            changed = compile_pointwise(model, attention=attention)
            n_attn = sum(1 for m in model.modules() if m.__dict__.get("attn_fn") is cpu_attention)
            n_head = sum(1 for m in model.modules() if isinstance(m, LMHead) and m.compiled)
            if changed - n_attn - n_head <= 0:
                raise RuntimeError("model.compile: compile_pointwise found no norm_fn/rope_fn/act_fn to compile")
            if rank == 0:
                extra = ([f"attention's backward in {n_attn} blocks (flash forward, megacpt's CPU backward)"]
                         if n_attn else []) + (["the loss head's softmax pass"] if n_head and bf16_cpu else [])
                also = f"; on CPU also {' and '.join(extra)}" if extra else ""
                print(f"torch.compile: pointwise code (RMSNorm, RoPE, SwiGLU) of {changed - n_attn - n_head} modules "
                      f"in {len(model.layers)} decoder blocks and the final norm{also}; linears stay eager under "
                      "ZeRO-3 (compiled at their first call)", flush=True)
        elif cfg.model.compile:
            # Per block, not the whole model: every block has the same graph, so one compilation is
            # reused by all of them, and the fused loss head (our own kernel) stays outside.
            for layer in model.layers:
                layer.compile()
            if rank == 0:
                print(f"torch.compile: {len(model.layers)} decoder blocks (compiled at their first call)", flush=True)
    from megacpt.train.stages import Stages, needs_embedding_group
    from megacpt.train.stages import param_groups as stage_groups

    groups, kinds = stage_groups(model, cfg.optim.weight_decay, needs_embedding_group(cfg))
    stages = Stages(model, kinds, cfg.optim.lr, cfg.optim.embedding_lr)
    group_decay = [g["weight_decay"] for g in groups]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config,
                                           mpu=None if topo.pp_size > 1 else mpu_for(topo))
    if topo.pp_size > 1:
        pipe_run = pipeline.PipelineRun(engine, pipe_state, topo, own_clip)
    mdist.release_shm_names(rank)
    device = engine.device

    step = 0
    base_valid = {}
    early_stopper = None
    if cfg.train.early_stopping is not None:
        from megacpt.train.early_stop import EarlyStopper

        early_stopper = EarlyStopper.from_config(cfg.train.early_stopping,
                                                 state.get("early_stopping") if state else None)
    skips: dict = {}  # phase name -> data batch indices skipped after non-finite losses
    if resume_dir is not None:
        _secure_load_check(resume_dir)
        if moments is not None:
            from megacpt.train.relayout import apply_moments

            apply_moments(engine, engine.module, topo, *moments, rename=pipeline.rename if pipe_run else None)
        else:
            engine.load_checkpoint(str(ckpt_root), tag=load_tag, load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
            _repair_optimizer_after_load(engine, group_decay)
        ckpt.restore_rng(resume_dir, rank)
        step = int(state["step"])
        base_valid = state.get("base_valid", {})
        skips = {k: list(v) for k, v in state.get("skipped_batches", {}).items()}
        if rank == 0:
            print(f"resuming from {resume_dir} at step {step}", flush=True)

    logger = MetricsLogger(run_dir, enabled=rank == 0, tensorboard=cfg.tensorboard)
    _write_layout(run_dir, engine.module, rank, world, cfg.parallel.zero_stage, topo,
                  rename=pipeline.rename if pipe_run else None)
    if rank == 0:
        with open(run_dir / "config.resolved.json", "w") as f:
            json.dump({"config": cfg.to_dict(), "deepspeed": ds_config, "world_size": world,
                       "model": args.to_dict(), "caching_malloc": caching_malloc}, f, indent=2)
    G, S, mb, gas = cfg.train.global_batch_size, cfg.data.seq_len, cfg.train.micro_batch_size, derived.grad_accum
    flops_tok = args.flops_per_token(S)
    dev_name = device_name()
    peak = peak_flops(dev_name)
    use_segments = cfg.data.document_mask or sft
    if sft and rank == 0 and sft_cut:
        print(f"note: {sft_cut} SFT examples are longer than data.seq_len+1 = {S + 1} tokens and were cut", flush=True)

    def evaluate(step_now: int) -> dict:
        out = {"step": step_now}
        for name, windows in valid.items():
            if sft:
                from megacpt.eval.sft import evaluate as sft_evaluate

                res = sft_evaluate(engine, windows, tokenizer, cfg.sft, mb, dp_rank, dp_size, device, dp_group)
                out.update({f"valid/{name}/{k}": v for k, v in res.items() if k != "tokens"})
            else:
                if pipe_run is not None:
                    loss_sum, count = pipe_run.evaluate(windows, mb)
                else:
                    loss_sum, count = _evaluate(engine, windows, mb, dp_rank, dp_size, device, dp_group)
                loss = loss_sum / max(count, 1)
                out[f"valid/{name}/loss"] = loss
                out[f"valid/{name}/ppl"] = math.exp(min(loss, 700))
            if name in base_valid:
                out[f"valid/{name}/ppl_vs_base"] = out[f"valid/{name}/ppl"] / base_valid[name]
        return out

    def save(step_now: int) -> None:
        st = {
            "step": step_now,
            "phase": phase_at(phases, min(step_now, total_steps - 1)).name,
            "consumed_samples": step_now * G,
            "tokens_per_source": tokens_per_source(phases, step_now, G, skips),
            "skipped_batches": skips,
            "base_valid": base_valid,
            "early_stopping": early_stopper.state() if early_stopper else None,
            "config": cfg.to_dict(),
            "world_size": world,
            "source_dir": str(source_dir) if source_dir else None,
        }
        path = ckpt.save(engine, ckpt_root, step_now, st, hf_cfg, cfg.checkpoint.keep, rank)
        if rank == 0:
            _say(f"checkpoint saved: {path}")

    use_bar = rank == 0 and sys.stderr.isatty()
    bar = None
    if use_bar:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)

    def _say(msg):
        if bar is not None:
            bar.write(msg)
        else:
            print(msg, flush=True)

    if valid and step == 0 and cfg.train.eval_at_start and not base_valid:
        rec = evaluate(0)
        base_valid = {n: rec[f"valid/{n}/ppl"] for n in valid}
        logger.log(rec)
        if early_stopper is not None:
            early_stopper.after_eval(rec, logger, can_stop=False)  # the base model sets the first best
        if rank == 0:
            _say("base model: " + ", ".join(f"{n} ppl={base_valid[n]:.3f}" for n in valid))

    steps_this_run = 0
    last_saved = step if resume_dir is not None else -1
    stopped_by = None
    rollbacks = 0
    recent = collections.deque(maxlen=50)  # losses, for spike detection
    where = {"op": "start"}  # what the step is doing, to name a collective that times out
    engine.train()
    while step < total_steps:
        phase = phase_at(phases, step)
        t0 = time.perf_counter()
        batch_index = data_batch_index(step - phase.start, skips.get(phase.name, []))
        if sft:
            batches = sft_data.rank_batches(phase.dataset, batch_index * G, mb, gas, dp_rank, dp_size)
        else:
            batches = _rank_batches(phase.dataset, batch_index * G, mb, gas, dp_rank, dp_size, use_segments,
                                    cfg.data.mask_eos_loss)
        lr = lr_for(phases, step)
        lr_log = stages.apply(engine.optimizer, lr, phase.trainable)
        try:
            poison = os.environ.get("MEGACPT_FAULT") == f"nan:{phase.name}:{batch_index}"
            if pipe_run is not None:
                out = pipe_run.train_step(batches, gas, stopper.flag, use_segments, where, poison)
            else:
                out = _train_step(engine, batches, topo, gas, cfg.parallel.zero_stage, stopper.flag, device,
                                  use_segments, where, poison)
        except RuntimeError as e:
            raise _collective_error(e, rank, step + 1, where) from e
        if not (math.isfinite(out.loss) and (out.grad_norm is None or math.isfinite(out.grad_norm))):
            # Every rank sees the same all-reduced loss and global norm, so all decide alike.
            event = {"step": step + 1, "event": "nonfinite", "loss": out.loss, "grad_norm": out.grad_norm}
            logger.log(event)
            last = ckpt.latest_checkpoint(ckpt_root) if ckpt_root.is_dir() else None
            if last is not None and layout_changed_at is not None and int(ckpt.read_state(last)["step"]) <= layout_changed_at:
                # That checkpoint is in the old layout: loading it into this engine would mix layouts.
                raise RuntimeError(f"non-finite loss/gradient at step {step + 1}, before the first checkpoint in "
                                   f"this run's new layout; rerun to resume from {last} (it is re-laid out "
                                   f"again), with a lower optim.lr if it recurs")
            if cfg.train.nonfinite == "stop" or last is None or rollbacks >= cfg.train.max_rollbacks:
                why = ("train.nonfinite is stop" if cfg.train.nonfinite == "stop" else
                       "no checkpoint to roll back to" if last is None else f"{rollbacks} rollbacks already")
                raise RuntimeError(f"non-finite loss/gradient at step {step + 1} ({why}); last good checkpoint: "
                                   f"{last or 'none'}; lower optim.lr or check the data, then rerun to resume")
            rollbacks += 1
            skips.setdefault(phase.name, []).append(batch_index)
            _secure_load_check(last)
            engine.load_checkpoint(str(ckpt_root), tag=last.name, load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
            _repair_optimizer_after_load(engine, group_decay)
            ckpt.restore_rng(last, rank)
            step = int(ckpt.read_state(last)["step"])
            if early_stopper is not None:  # the evaluations after `last` are made again
                early_stopper = EarlyStopper.from_config(cfg.train.early_stopping,
                                                         ckpt.read_state(last).get("early_stopping"))
            if rank == 0:
                _say(f"non-finite loss at data batch {batch_index} of phase {phase.name}: rolled back to {last.name}, "
                     f"skipping that batch ({rollbacks}/{cfg.train.max_rollbacks})")
            continue
        step += 1
        steps_this_run += 1
        dt = time.perf_counter() - t0
        if cfg.train.spike_factor and len(recent) >= 10 and out.loss > cfg.train.spike_factor * statistics.median(recent):
            logger.log({"step": step, "event": "loss_spike", "loss": out.loss, "median": statistics.median(recent)})
            if rank == 0:
                _say(f"warning: loss spike at step {step}: {out.loss:.4f} > {cfg.train.spike_factor} × median "
                     f"{statistics.median(recent):.4f} of the last {len(recent)} steps")
        recent.append(out.loss)
        if rank == 0 and (step % cfg.train.log_interval == 0 or step == total_steps):
            rec = {"step": step, "phase": phase.name, "loss": out.loss, "lr": lr, "grad_norm": out.grad_norm,
                   "step_time_s": dt, "peak_memory_mb": peak_memory_mb(), "consumed_samples": step * G,
                   "samples_fingerprint": out.fingerprint % 2**48, **lr_log}
            rec.update(throughput(G * S, dt, world, flops_tok, peak))
            for name, n in tokens_per_source(phases, step, G, skips).items():
                rec[f"tokens/{name}"] = n
            logger.log(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{out.loss:.4f}", lr=f"{lr:.2e}")
            else:
                print(format_console(rec), flush=True)
        if bar is not None:
            bar.update(1)
        early = None
        if valid and (step % cfg.train.eval_interval == 0 or step == total_steps):
            rec = evaluate(step)
            logger.log(rec)
            if rank == 0:
                _say("valid: " + ", ".join(f"{n} ppl={rec[f'valid/{n}/ppl']:.3f}" + "".join(
                    f" {k}={rec[f'valid/{n}/{k}']:.3f}" for k in ("exact_match", "token_f1", "bleu")
                    if f"valid/{n}/{k}" in rec) for n in valid))
            if early_stopper is not None and step < total_steps:
                early = early_stopper.after_eval(rec, logger)
        if early:
            stopped_by = early
        elif out.stop_signal:
            stopped_by = stopper.name or "signal"
        elif cfg.train.stop_after is not None and steps_this_run >= cfg.train.stop_after and step < total_steps:
            stopped_by = "train.stop_after"
        if step % cfg.checkpoint.interval == 0 or (step == total_steps and cfg.checkpoint.final) or stopped_by:
            save(step)
            last_saved = step
        if stopped_by:
            break
    if last_saved != step and (cfg.checkpoint.final or step < total_steps):
        save(step)
    if bar is not None:
        bar.close()
    if rank == 0:
        if early_stopper is not None and early_stopper.stopped_at is not None:
            print(f"stopped at step {step}/{total_steps} ({stopped_by}); checkpoint written", flush=True)
        elif stopped_by:
            print(f"stopped at step {step}/{total_steps} ({stopped_by}); checkpoint written, rerun to resume", flush=True)
        elif valid and base_valid:
            final = evaluate_summary_from_log(run_dir)
            print(_summary_table(base_valid, final), flush=True)
    logger.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


@dataclass
class StepOut:
    loss: float  # token mean over the global batch
    grad_norm: float | None
    fingerprint: int
    stop_signal: bool


def _train_step(engine, batches: list[dict], topo, gas: int, zero_stage: int, stop_flag: bool, device,
                use_segments: bool, where: dict, poison: bool = False) -> StepOut:
    """One optimizer step over this rank's micro-batches. Sums over the data-parallel group only:
    tensor-parallel ranks hold the same batch and would count it tp times."""
    import torch
    import torch.distributed as dist

    dp_size, dp_group = topo.dp_size, topo.dp_group
    where["op"] = "all-reduce of the token count"
    local = torch.tensor([sum(int((b["labels"] != IGNORE).sum()) for b in batches)], dtype=torch.float64)
    dist.all_reduce(local, group=dp_group)
    global_tokens = max(float(local.item()), 1.0)
    # DeepSpeed divides by the accumulation steps and averages over data-parallel ranks;
    # scaling by (dp × gas / tokens) turns that into the token mean of the whole global batch.
    scale = dp_size * gas / global_tokens
    loss_sum = torch.zeros((), dtype=torch.float64)
    plain_norm = None
    for i, b in enumerate(batches):
        kwargs = {"segment_ids": b["segments"].to(device)} if use_segments else {}
        where["op"] = f"forward of micro-batch {i} (ZeRO parameter all-gather)"
        out = engine(b["input_ids"].to(device), labels=b["labels"].to(device), **kwargs)
        if poison:
            out = out * float("nan")  # fault injection (MEGACPT_FAULT=nan:STEP): a diverging batch
        where["op"] = f"backward of micro-batch {i} (gradient reduce-scatter)"
        engine.backward(out * scale)
        if i == len(batches) - 1 and zero_stage == 0:
            # Without ZeRO, DeepSpeed clips but does not report the norm: measure the
            # (already data-parallel averaged) gradients before the optimizer step.
            plain_norm = _grad_norm(engine.module, topo)
        where["op"] = "optimizer step"
        engine.step()
        loss_sum += out.detach().double().cpu()
    where["op"] = "all-reduce of the loss and stop flag"
    stats = torch.stack([loss_sum, torch.tensor(float(stop_flag), dtype=torch.float64)])
    dist.all_reduce(stats[:1], group=dp_group)
    dist.all_reduce(stats[1:], op=dist.ReduceOp.MAX)  # the stop decision spans the whole world
    fingerprint = torch.tensor([sum(b["fingerprint"] for b in batches)], dtype=torch.int64)
    dist.all_reduce(fingerprint, group=dp_group)
    norm = plain_norm if plain_norm is not None else engine.get_global_grad_norm()
    return StepOut(loss=float(stats[0]) / global_tokens, grad_norm=None if norm is None else float(norm),
                   fingerprint=int(fingerprint), stop_signal=bool(stats[1] > 0))


def _layout_of(state: dict) -> str:
    par = state["config"].get("parallel", {})
    return f"tp={par.get('tp', 1)} pp={par.get('pp', 1)} on {state.get('world_size')} ranks"


def _layout_changed(state: dict, cfg: Config, world: int) -> bool:
    """A resume that needs the checkpoint re-sliced: tp or pp changed, or the world size changed
    while either layout splits the model (a dp-only change goes through universal checkpoints)."""
    par = state["config"].get("parallel", {})
    old_pp, new_pp = int(par.get("pp", 1)), cfg.parallel.pp
    old = (int(par.get("tp", 1)), old_pp, par.get("pp_balance", "parameters") if old_pp > 1 else None)
    new = (cfg.parallel.tp, new_pp, cfg.parallel.pp_balance if new_pp > 1 else None)
    split = max(old[0], old[1], new[0], new[1]) > 1
    return old != new or (split and int(state.get("world_size", world)) != world)


def _collective_error(e: RuntimeError, rank: int, step: int, where: dict) -> RuntimeError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    low = msg.lower()
    if any(w in low for w in ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")):
        return RuntimeError(f"rank {rank}: collective failed at step {step} during {where['op']}: {msg} — another "
                            f"rank stopped participating or died (see its log); rerun to resume from the last checkpoint")
    return e


def data_batch_index(k: int, skipped: list[int]) -> int:
    """The k-th batch index of a phase that was not skipped (after a non-finite rollback)."""
    idx = k
    for s in sorted(skipped):
        if s <= idx:
            idx += 1
        else:
            break
    return idx


def _rank_batches(dataset, first_sample: int, mb: int, gas: int, dp_rank: int, dp_size: int,
                  use_segments: bool, mask_eos: bool) -> list[dict]:
    """This rank's micro-batches of a global batch: micro-step m takes samples
    first + m·mb·dp + dp_rank·mb + [0, mb)."""
    import torch

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


def _check_relayout_supported(old: dict, cfg: Config, old_layout: str) -> None:
    """The state re-slicing (train/relayout.py) reads plain fp32 optimizer state in the default
    parameter-group order; refuse the cases it does not cover instead of mis-assigning moments."""
    import torch

    from megacpt.train.engine import resolve_precision

    o_train, o_optim = old.get("train", {}), old.get("optim", {})
    old_emb = (o_optim.get("embedding_lr") is not None or o_train.get("trainable", "all") == "embeddings"
               or any(p.get("trainable") == "embeddings" for p in old.get("phases", [])))
    from megacpt.train.stages import needs_embedding_group

    fix = f"resume with the original layout ({old_layout}), or start a new run_dir with model.init_from"
    if old_emb or needs_embedding_group(cfg):
        raise ConfigError(f"resuming in another layout is not supported for runs with optim.embedding_lr or "
                          f"embeddings-only stages; {fix}")
    if {resolve_precision(old.get("precision", "auto")), resolve_precision(cfg.precision)} != {torch.float32}:
        raise ConfigError(f"resuming in another layout is supported for fp32 runs only (bf16 optimizer state lives in "
                          f"DeepSpeed's flat wrappers); {fix}")


def _repair_optimizer_after_load(engine, group_decay: list) -> None:
    """Undo two slips of DeepSpeed 0.19's universal-checkpoint loader (harmless otherwise):
    it copies the first group's hyperparameters into every group (weight decay would hit norms
    and biases), and it gives every group the *same* Adam step tensor, which torch increments in
    place once per group, so bias correction would advance by several steps per step."""
    import torch

    for g, wd in zip(engine.optimizer.param_groups, group_decay):
        g["weight_decay"] = wd
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for st in inner.state.values():
        if isinstance(st.get("step"), torch.Tensor):
            st["step"] = st["step"].clone()


def _write_layout(run_dir: Path, module, rank: int, world: int, zero_stage: int, topo=None, rename=None) -> None:
    """run_dir/layout.json: how many elements of each parameter every rank holds (shows sharding:
    ZeRO partitions, tensor-parallel slices, pipeline stages — 0 where a rank has none of it)."""
    import torch.distributed as dist

    mine = {}
    for name, p in module.named_parameters():
        full = int(getattr(p, "ds_numel", p.numel()))
        local = int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else int(p.numel())
        mine[rename(name) if rename else name] = (full, local)
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        names: dict = {}
        for held in every:
            for n, (full, _) in held.items():
                names.setdefault(n, full)
        layout = {
            "world_size": world,
            "zero_stage": zero_stage,
            "params": {n: {"numel": f, "per_rank": [held.get(n, (0, 0))[1] for held in every]}
                       for n, f in names.items()},
            "per_rank_total": [sum(v[1] for v in held.values()) for held in every],
            "total": sum(names.values()),
        }
        if topo is not None:
            layout["ranks"] = [dict(zip(("pp", "dp", "tp"), topo.layout.coords(r))) for r in range(world)]
        with open(run_dir / "layout.json", "w") as fh:
            json.dump(layout, fh, indent=1)


def _grad_norm(module, topo) -> float:
    from megacpt.parallel import tp_grad_norm

    return float(tp_grad_norm(module, topo))


def _evaluate(engine, windows: np.ndarray, mb: int, dp_rank: int, dp_size: int, device,
              dp_group=None) -> tuple[float, int]:
    """Sum of token losses and token count over all windows, split over data-parallel ranks.

    Every rank runs the same number of forward calls (ZeRO-3 gathers parameters collectively),
    padding with fully ignored batches when it runs out of windows.
    """
    import torch
    import torch.distributed as dist

    mine = windows[dp_rank::dp_size]
    per_rank = -(-len(windows) // dp_size)
    calls = -(-per_rank // mb)
    total = torch.zeros(2, dtype=torch.float64)
    was_training = engine.training
    engine.eval()
    with torch.no_grad():
        for c in range(calls):
            chunk = mine[c * mb : (c + 1) * mb]
            pad = len(chunk) == 0
            if pad:
                chunk = windows[:1]
            t = torch.from_numpy(np.ascontiguousarray(chunk))
            labels = t[:, 1:].clone()
            if pad:
                labels.fill_(IGNORE)
            out = engine(t[:, :-1].to(device), labels=labels.to(device))
            total[0] += out.double().cpu()
            total[1] += float((labels != IGNORE).sum())
    if was_training:
        engine.train()
    dist.all_reduce(total, group=dp_group)
    return float(total[0]), int(total[1])


def evaluate_summary_from_log(run_dir: Path) -> dict:
    """Latest validation ppl per domain from metrics.jsonl."""
    final = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            for k, v in rec.items():
                if k.startswith("valid/") and k.endswith("/ppl"):
                    final[k.split("/")[1]] = v
    return final


def _summary_table(base: dict, final: dict) -> str:
    lines = ["", "held-out perplexity      before      after     change"]
    for name in base:
        b, a = base[name], final.get(name, float("nan"))
        lines.append(f"  {name:<20} {b:>10.3f} {a:>10.3f} {100 * (a / b - 1):>+9.1f}%")
    return "\n".join(lines)


def _secure_load_check(ckpt_dir: Path) -> None:
    """Refuse a checkpoint whose .pt files would run code when DeepSpeed unpickles them."""
    from megacpt.train.safe_load import check_torch_file

    for path in sorted(Path(ckpt_dir).rglob("*.pt")):
        check_torch_file(path)

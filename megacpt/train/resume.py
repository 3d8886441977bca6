"""What a run starts from: weights only (`model.init_from`), a resume of everything from the run's
own latest checkpoint, or a resume in another layout (re-sliced by relayout.py, or resharded over
another data-parallel size through DeepSpeed's universal checkpoint); and restoring it into the
engine, which a non-finite rollback does again with an older checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from megacpt.config import Config, config_from_dict, run_changing_diff
from megacpt.errors import ConfigError
from megacpt.models.hf import StateDictWeights, read_hf_config
from megacpt.safe_load import check_torch_file
from megacpt.train import checkpoint as ckpt
from megacpt.train import task_eval
from megacpt.train.consolidate import checkpoint_weights
from megacpt.train.early_stop import EarlyStopper
from megacpt.train.engine import resolve_precision
from megacpt.train.evaluate import restore_base
from megacpt.train.relayout import apply_moments, read_layout_free
from megacpt.train.stages import needs_embedding_group
from megacpt.train.state import RunState, Start


def resolve_start(cfg: Config, world: int) -> Start:
    """Resume when the run dir holds a checkpoint, else start from model.init_from (an HF dir or
    a megacpt checkpoint, weights only). Checks everything that can be checked before ranks start:
    every rank verifies the checkpoint's manifest (the same files, so the same choice everywhere)
    and falls back to the newest intact checkpoint when the latest is damaged."""
    ckpt_root = Path(cfg.run_dir) / "checkpoints"
    resume_dir, notes = ckpt.newest_intact(ckpt_root) if ckpt_root.is_dir() else (None, [])
    if resume_dir is None:
        return _start_from_weights(cfg)
    state = ckpt.read_state(resume_dir)
    check_resume_compatible(state["config"], cfg)
    start = Start(base_cfg=json.loads((resume_dir / ckpt.HF_CONFIG_FILE).read_text()),
                  source_dir=state.get("source_dir"), resume_dir=resume_dir, state=state, notes=notes)
    start.finished = (state.get("early_stopping") or {}).get("stopped_at") is not None
    return start


def _start_from_weights(cfg: Config) -> Start:
    if not cfg.model.init_from:
        raise ConfigError("model.init_from is not set: point it at a Hugging Face model dir or a megacpt checkpoint")
    init_ckpt = ckpt.resolve_checkpoint(cfg.model.init_from)
    if init_ckpt is None:
        return Start(base_cfg=read_hf_config(cfg.model.init_from), source_dir=cfg.model.init_from,
                     weights=cfg.model.init_from)
    weights = checkpoint_weights(init_ckpt)  # first: it verifies the manifest before any file is read
    return Start(base_cfg=json.loads((init_ckpt / ckpt.HF_CONFIG_FILE).read_text()),
                 source_dir=ckpt.read_state(init_ckpt).get("source_dir"), weights=weights)


def check_layout_change(start: Start, cfg: Config, world: int) -> None:
    """Whether the resume changes the layout (tp, pp, or world size with tp/pp > 1), and whether
    that change is one we can re-slice."""
    if start.resume_dir is None:
        return
    state = start.state
    start.relayout = layout_changed(state, cfg, world)
    if start.relayout and int(state["config"].get("parallel", {}).get("zero_stage", 0)) >= 3:
        raise ConfigError(f"resuming a ZeRO-3 run in another layout (tp/pp, or world size with tp/pp > 1) is not "
                          f"supported; relaunch with its own layout ({layout_of(state)}), or start a new run_dir "
                          f"with model.init_from pointing at this run")
    resharded = int(state.get("world_size", world)) != world and cfg.parallel.zero_stage > 0
    if cfg.adapter is not None and (start.relayout or resharded):
        # Both re-slicing paths (relayout.py, DeepSpeed's universal checkpoint) expect every
        # parameter in the optimizer; an adapter run keeps the frozen base out of it.
        raise ConfigError(f"resuming an adapter run in another layout or world size is not supported; relaunch "
                          f"with its own ({layout_of(state)}), or start a new run_dir with model.init_from "
                          f"pointing at this run (its merged weights)")
    if start.relayout:
        check_relayout_supported(state["config"], cfg, layout_of(state))


def check_resume_compatible(old: dict, new: Config) -> None:
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


def layout_of(state: dict) -> str:
    par = state["config"].get("parallel", {})
    cp = f" cp={par['cp']}" if par.get("cp", 1) != 1 else ""
    return f"tp={par.get('tp', 1)} pp={par.get('pp', 1)}{cp} on {state.get('world_size')} ranks"


def layout_changed(state: dict, cfg: Config, world: int) -> bool:
    """A resume that needs the checkpoint re-sliced: tp or pp changed, or the world size changed
    while either layout splits the model (a dp-only change goes through universal checkpoints)."""
    par = state["config"].get("parallel", {})
    old_pp, new_pp = int(par.get("pp", 1)), cfg.parallel.pp
    old = (int(par.get("tp", 1)), old_pp, par.get("pp_balance", "parameters") if old_pp > 1 else None)
    new = (cfg.parallel.tp, new_pp, cfg.parallel.pp_balance if new_pp > 1 else None)
    split = max(old[0], old[1], new[0], new[1]) > 1
    return old != new or (split and int(state.get("world_size", world)) != world)


def check_relayout_supported(old: dict, cfg: Config, old_layout: str) -> None:
    """The state re-slicing (train/relayout.py) reads plain fp32 optimizer state in the default
    parameter-group order; refuse the cases it does not cover instead of mis-assigning moments."""
    o_train, o_optim = old.get("train", {}), old.get("optim", {})
    old_emb = (o_optim.get("embedding_lr") is not None or o_train.get("trainable", "all") == "embeddings"
               or any(p.get("trainable") == "embeddings" for p in old.get("phases", [])))
    fix = f"resume with the original layout ({old_layout}), or start a new run_dir with model.init_from"
    if o_train.get("freeze") or o_optim.get("layer_lr_decay") is not None or cfg.train.freeze \
            or cfg.optim.layer_lr_decay is not None:
        raise ConfigError(f"resuming in another layout is not supported for runs with train.freeze or "
                          f"optim.layer_lr_decay (their optimizer groups differ from the default order); {fix}")
    if old_emb or needs_embedding_group(cfg):
        raise ConfigError(f"resuming in another layout is not supported for runs with optim.embedding_lr or "
                          f"embeddings-only stages; {fix}")
    if {resolve_precision(old.get("precision", "auto")), resolve_precision(cfg.precision)} != {torch.float32}:
        raise ConfigError(f"resuming in another layout is supported for fp32 runs only (bf16 optimizer state lives in "
                          f"DeepSpeed's flat wrappers); {fix}")


def plan_layout_change(rs: RunState) -> None:
    """After the ranks start, before the build: where this rank's weights come from when the
    resume changes the layout. Sets rs.start.weights, rs.moments, rs.ds_config, rs.load_tag and
    rs.layout_changed_at (checkpoints up to it are in the old layout: a rollback must not load them)."""
    start, cfg = rs.start, rs.cfg
    rs.load_tag = start.resume_dir.name if start.resume_dir is not None else None
    if start.relayout:
        full, adam_step = read_layout_free(start.resume_dir, rs.args, start.state["config"].get("parallel", {}))
        start.weights = StateDictWeights({n: v["fp32"] for n, v in full.items()})
        rs.moments = (full, adam_step)
        rs.layout_changed_at = int(start.state["step"])
        rs.say(f"re-laying out checkpoint {layout_of(start.state)} as tp={cfg.parallel.tp} pp={cfg.parallel.pp} "
               f"on {rs.world} ranks (weights and Adam moments re-sliced)")
    elif (start.resume_dir is not None and int(start.state.get("world_size", rs.world)) != rs.world
          and cfg.parallel.zero_stage > 0):
        # ZeRO partitions depend on the data-parallel size: reshard through DeepSpeed's
        # universal checkpoint (converted once, next to the original, by rank 0).
        if rs.rank == 0:
            ckpt.make_universal(start.resume_dir)
        dist.barrier()
        rs.ds_config = dict(rs.ds_config, checkpoint={"load_universal": True})
        rs.load_tag = f"{start.resume_dir.name}/{ckpt.UNIVERSAL}"
        rs.layout_changed_at = int(start.state["step"])
        rs.say(f"resharding checkpoint from {start.state['world_size']} to {rs.world} ranks (universal checkpoint)")


def restore(rs: RunState, rename=None) -> None:
    """Resume: model, optimizer, RNG, step, base perplexities, skipped batches, early stopping."""
    start, cfg = rs.start, rs.cfg
    state = start.state
    if cfg.train.early_stopping is not None:
        rs.early_stopper = EarlyStopper.from_config(cfg.train.early_stopping,
                                                    state.get("early_stopping") if state else None)
    if start.resume_dir is None:
        return
    for note in start.notes:
        rs.say(note)
    secure_load_check(start.resume_dir)
    if rs.moments is not None:
        apply_moments(rs.engine, rs.engine.module, rs.topo, *rs.moments, rename=rename)
    else:
        load_engine_state(rs, rs.load_tag)
    ckpt.restore_rng(start.resume_dir, rs.rank)
    rs.step = int(state["step"])
    rs.last_saved = rs.step
    restore_base(rs, state)
    task_eval.restore_base(rs, state)
    rs.skips = {k: list(v) for k, v in state.get("skipped_batches", {}).items()}
    rs.say(f"resuming from {start.resume_dir} at step {rs.step}")


def load_engine_state(rs: RunState, tag: str) -> None:
    rs.engine.load_checkpoint(str(rs.ckpt_root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    repair_optimizer_after_load(rs.engine, rs.group_decay)


def repair_optimizer_after_load(engine, group_decay: list) -> None:
    """Undo two slips of DeepSpeed 0.19's universal-checkpoint loader (harmless otherwise):
    it copies the first group's hyperparameters into every group (weight decay would hit norms
    and biases), and it gives every group the *same* Adam step tensor, which torch increments in
    place once per group, so bias correction would advance by several steps per step."""
    for g, wd in zip(engine.optimizer.param_groups, group_decay):
        g["weight_decay"] = wd
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for st in inner.state.values():
        if isinstance(st.get("step"), torch.Tensor):
            st["step"] = st["step"].clone()


def secure_load_check(ckpt_dir: Path) -> None:
    """Refuse a checkpoint whose .pt files would run code when DeepSpeed unpickles them."""
    for path in sorted(Path(ckpt_dir).rglob("*.pt")):
        check_torch_file(path)

"""A non-finite loss or gradient norm: roll back to the last checkpoint and skip the batch that
diverged (train.nonfinite: rollback, at most train.max_rollbacks times), or stop with a message.
Every rank sees the same all-reduced loss and global norm, so all decide alike."""

from __future__ import annotations

import math

from megacpt.train import checkpoint as ckpt
from megacpt.train.early_stop import EarlyStopper
from megacpt.train.resume import load_engine_state, secure_load_check
from megacpt.train.state import RunState
from megacpt.train.step import StepOut


def is_finite(out: StepOut) -> bool:
    """False for a NaN/inf loss or gradient norm, for a negative norm (DeepSpeed's -1 sentinel for
    one that came out inf/NaN), and when some rank flagged its own loss or norm (out.nonfinite)."""
    if out.nonfinite or not math.isfinite(out.loss):
        return False
    return out.grad_norm is None or (math.isfinite(out.grad_norm) and out.grad_norm >= 0)


def roll_back(rs: RunState, out: StepOut, phase_name: str, batch_index: int) -> None:
    """Load the last checkpoint and mark the batch skipped, or raise when that is not allowed."""
    cfg = rs.cfg
    rs.logger.log({"step": rs.step + 1, "event": "nonfinite", "loss": out.loss, "grad_norm": out.grad_norm})
    if rs.saver is not None:  # every rank is here: the save in flight is finished first, the one to roll back to
        rs.saver.wait()
    last, notes = ckpt.newest_intact(rs.ckpt_root) if rs.ckpt_root.is_dir() else (None, [])
    if last is not None and rs.layout_changed_at is not None and int(ckpt.read_state(last)["step"]) <= rs.layout_changed_at:
        # That checkpoint is in the old layout: loading it into this engine would mix layouts.
        raise RuntimeError(f"non-finite loss/gradient at step {rs.step + 1}, before the first checkpoint in "
                           f"this run's new layout; rerun to resume from {last} (it is re-laid out "
                           f"again), with a lower optim.lr if it recurs")
    if cfg.train.nonfinite == "stop" or last is None or rs.rollbacks >= cfg.train.max_rollbacks:
        why = ("train.nonfinite is stop" if cfg.train.nonfinite == "stop" else
               "no checkpoint to roll back to" if last is None else f"{rs.rollbacks} rollbacks already")
        raise RuntimeError(f"non-finite loss/gradient at step {rs.step + 1} ({why}); last good checkpoint: "
                           f"{last or 'none'}; lower optim.lr or check the data, then rerun to resume")
    rs.rollbacks += 1
    for note in notes:
        rs.say(note)
    rs.skips.setdefault(phase_name, []).append(batch_index)
    secure_load_check(last)
    load_engine_state(rs, last.name)
    ckpt.restore_rng(last, rs.rank)
    state = ckpt.read_state(last)
    rs.step = int(state["step"])
    if rs.early_stopper is not None:  # the evaluations after `last` are made again
        rs.early_stopper = EarlyStopper.from_config(cfg.train.early_stopping, state.get("early_stopping"))
    rs.say(f"non-finite loss at data batch {batch_index} of phase {phase_name}: rolled back to {last.name}, "
           f"skipping that batch ({rs.rollbacks}/{cfg.train.max_rollbacks})")

"""Early stopping on a validation metric: stop after `patience` evaluations in a row that did not
beat the best value by more than `min_delta`. The first evaluation (the base model at step 0 when
train.eval_at_start is on) sets the first best. Its state travels in the checkpoint, so a resumed
run counts on where it left off, and a run that stopped early stays stopped."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from megacpt.config import early_stopping_mode


@dataclass
class EarlyStopper:
    metric: str
    patience: int
    min_delta: float = 0.0
    mode: str = "min"
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_at: int | None = None

    @classmethod
    def from_config(cls, es, state: dict | None = None) -> "EarlyStopper":
        out = cls(es.metric, es.patience, es.min_delta, early_stopping_mode(es))
        if state and state.get("metric") == es.metric:
            out.best, out.best_step = state.get("best"), state.get("best_step")
            out.bad_evals, out.stopped_at = int(state.get("bad_evals", 0)), state.get("stopped_at")
        return out

    def update(self, step: int, value: float) -> str | None:
        """Record an evaluation; returns the reason to stop, or None to go on."""
        value = float(value)
        better = math.isfinite(value) and (
            self.best is None
            or (value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta))
        if better:
            self.best, self.best_step, self.bad_evals = value, step, 0
            return None
        self.bad_evals += 1
        if self.bad_evals < self.patience:
            return None
        self.stopped_at = step
        return self.reason()

    def after_eval(self, rec: dict, logger, can_stop: bool = True) -> str | None:
        """update() from a validation record, ranks agreeing, the stop logged as an event."""
        value = rec.get(self.metric)
        if value is None:  # e.g. ppl_vs_base at step 0
            return None
        why = self.update(rec["step"], value)
        if not can_stop:  # a non-finite base value counts as a bad evaluation but cannot stop by itself
            why, self.stopped_at, self.bad_evals = None, None, min(self.bad_evals, self.patience - 1)
        # Evaluations are all-reduced, so ranks already agree; the MAX makes it a guarantee.
        flag = torch.tensor([1.0 if why else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self.stopped_at = rec["step"]
            why = why or self.reason()
            logger.log({"step": rec["step"], "event": "early_stop", "metric": self.metric, "best": self.best,
                        "best_step": self.best_step, "reason": why})
        return why

    def reason(self) -> str:
        best = "none" if self.best is None else f"{self.best:.6g} at step {self.best_step}"
        return (f"early stopping: {self.metric} did not improve by more than {self.min_delta:g} "
                f"({self.mode}) for {self.patience} evaluations; best {best}")

    def state(self) -> dict:
        return asdict(self)

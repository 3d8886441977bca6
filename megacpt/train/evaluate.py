"""Validation during training: loss and perplexity per held-out domain (SFT adds generation
metrics), relative to the base model's perplexity at step 0 (forgetting and learning)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megacpt.eval.sft import evaluate as sft_evaluate
from megacpt.labels import IGNORE
from megacpt.train import task_eval
from megacpt.train.state import RunState

SFT_METRICS = ("exact_match", "token_f1", "bleu")


def validation_record(rs: RunState, step: int) -> dict:
    """{"step", "valid/<name>/loss", ".../ppl", ".../ppl_vs_base", SFT metrics}: equal on every rank."""
    out = {"step": step}
    topo, mb, device = rs.topo, rs.cfg.train.micro_batch_size, rs.engine.device
    for name, windows in rs.valid.items():
        if rs.sft:
            res = sft_evaluate(rs.engine, windows, rs.tokenizer, rs.cfg.sft, mb, topo, device)
            out.update({f"valid/{name}/{k}": v for k, v in res.items() if k != "tokens"})
        else:
            if rs.pipe_run is not None:
                loss_sum, count = rs.pipe_run.evaluate(windows, mb)
            else:
                loss_sum, count = window_loss(rs.engine, windows, mb, topo, device)
            loss = loss_sum / max(count, 1)
            out[f"valid/{name}/loss"] = loss
            out[f"valid/{name}/ppl"] = math.exp(min(loss, 700))
        if name in rs.base_valid:
            out[f"valid/{name}/ppl_vs_base"] = out[f"valid/{name}/ppl"] / rs.base_valid[name]
    return out


def evaluate_base(rs: RunState) -> None:
    """The base model at step 0: the perplexities and task metrics later evaluations are compared with."""
    rec = evaluation_record(rs, 0, bool(rs.valid), rs.task_eval is not None)
    rs.base_valid = {n: rec[f"valid/{n}/ppl"] for n in rs.valid}
    rs.logger.log(rec)
    if rs.early_stopper is not None:
        rs.early_stopper.after_eval(rec, rs.logger, can_stop=False)  # the base model sets the first best
    rs.say("base model: " + describe(rs, rec))


def evaluation_record(rs: RunState, step: int, valid: bool, tasks: bool) -> dict:
    rec = validation_record(rs, step) if valid else {"step": step}
    if tasks:
        rec.update(task_eval.task_record(rs))
    return rec


def describe(rs: RunState, rec: dict) -> str:
    """The console line of an evaluation: perplexities (and SFT metrics), then task metrics."""
    parts = [f"{n} ppl={rec[f'valid/{n}/ppl']:.3f}" + "".join(
        f" {k}={rec[f'valid/{n}/{k}']:.3f}" for k in SFT_METRICS if f"valid/{n}/{k}" in rec)
        for n in rs.valid if f"valid/{n}/ppl" in rec]
    parts += [f"{k[5:]}={v:.4f}" for k, v in rec.items() if k.startswith("task/") and not k.endswith("_vs_base")]
    return ", ".join(parts)


def evaluate_now(rs: RunState, valid: bool = True, tasks: bool = False) -> str | None:
    """Evaluation at the current step; returns the early-stopping reason, if it says stop."""
    rec = evaluation_record(rs, rs.step, valid, tasks)
    rs.logger.log(rec)
    rs.say(("valid: " if valid else "tasks: ") + describe(rs, rec))
    if rs.early_stopper is not None and rs.step < rs.total_steps:
        return rs.early_stopper.after_eval(rec, rs.logger)
    return None


def window_loss(engine, windows: np.ndarray, mb: int, topo, device) -> tuple[float, int]:
    """Sum of token losses and token count over all windows, split over data-parallel ranks.

    Every rank runs the same number of forward calls (ZeRO-3 gathers parameters collectively),
    padding with fully ignored batches when it runs out of windows. Context-parallel ranks run
    whole windows here (no cp in the forward), so the grad group (dp × cp) splits the windows.
    """
    mine = windows[topo.grad_rank::topo.grad_size]
    per_rank = -(-len(windows) // topo.grad_size)
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
    dist.all_reduce(total, group=topo.grad_group)
    return float(total[0]), int(total[1])


def latest_perplexities(run_dir: Path) -> dict:
    """Latest validation ppl per domain from metrics.jsonl."""
    final = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            for k, v in rec.items():
                if k.startswith("valid/") and k.endswith("/ppl"):
                    final[k.split("/")[1]] = v
    return final


def latest_task_metrics(run_dir: Path) -> dict:
    """Latest task/<name>/<metric> values from metrics.jsonl (no _vs_base)."""
    final = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            final.update({k: v for k, v in rec.items() if k.startswith("task/") and not k.endswith("_vs_base")})
    return final


def summary_table(base: dict, final: dict, base_tasks: dict | None = None, final_tasks: dict | None = None) -> str:
    lines = [""] + (["held-out perplexity      before      after     change"] if base else [])
    for name in base:
        b, a = base[name], final.get(name, float("nan"))
        lines.append(f"  {name:<20} {b:>10.3f} {a:>10.3f} {100 * (a / b - 1):>+9.1f}%")
    if base_tasks:
        lines.append("task metric                        before      after     change")
        for key, b in base_tasks.items():
            a = (final_tasks or {}).get(key, float("nan"))
            lines.append(f"  {key[5:]:<30} {b:>10.4f} {a:>10.4f} {a - b:>+10.4f}")
    return "\n".join(lines)

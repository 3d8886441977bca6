"""Validation during training: loss and perplexity per held-out domain (SFT adds generation
metrics), relative to the base model's perplexity at step 0 (forgetting and learning).

A set with by_position is read as `megacpt eval --by-position` reads it (one window per document,
from its start) and also logs the loss per bucket of positions, valid/NAME/pos_START_END/loss
and /ppl, with the bucketing of megacpt.eval.by_position.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megacpt.config import Config, ValidSource
from megacpt.errors import ConfigError, DataError, UserError
from megacpt.eval.by_position import accumulate, bucket, document_windows
from megacpt.eval.perplexity import eval_windows
from megacpt.eval.sft import evaluate as sft_evaluate
from megacpt.labels import IGNORE
from megacpt.positions import bucket_name, parse_bucket
from megacpt.train import classify, task_eval
from megacpt.train.state import RunState

# Document windows are padded to a multiple of this (× tp) per micro-batch: fewer distinct shapes
# for compiled blocks and kernels, divisible by tp for sequence parallelism.
PAD_MULTIPLE = 64


@dataclass
class DocumentWindows:
    """A by-position set: one window per document (megacpt.eval.by_position.document_windows),
    longest first so that micro-batches hold windows of similar length and pad little."""
    windows: list
    seq_len: int
    width: int


def valid_windows(cfg: Config, v: ValidSource, seq_len: int, vocab_size: int):
    """A validation set's windows: consecutive (n, seq_len+1) windows, or DocumentWindows."""
    if v.by_position:
        docs = document_windows(v.path, seq_len, cfg.data.valid_tokens)
        if not docs:
            raise DataError(f"data.valid {v.name}: data.valid_tokens {cfg.data.valid_tokens} leaves no window; "
                            f"raise it")
        out = DocumentWindows(sorted(docs, key=len, reverse=True), seq_len, v.by_position)
        top = max(int(w.max()) for w in docs)
        check_bucket_reached(cfg, v.name, len(out.windows[0]) - 1)
    else:
        out = eval_windows(v.path, seq_len, cfg.data.valid_tokens)
        top = int(out.max())
    if top >= vocab_size:
        raise UserError(f"data.valid {v.name}: token id {top} ≥ model vocab {vocab_size}; "
                        f"re-run megacpt prepare with the model's tokenizer")
    return out


def check_bucket_reached(cfg: Config, name: str, longest: int) -> None:
    """An early-stopping bucket that no document reaches is never logged, so it could never stop."""
    es = cfg.train.early_stopping
    parts = es.metric.split("/") if es is not None else []
    span = parse_bucket(parts[2]) if len(parts) == 4 and parts[1] == name else None
    if span is not None and span[0] >= longest:
        raise ConfigError(f"train.early_stopping.metric {es.metric!r}: no document of data.valid {name} reaches "
                          f"position {span[0]} (the longest window has {longest} input tokens within "
                          f"data.valid_tokens); pick an earlier bucket or raise data.valid_tokens")

SFT_METRICS = ("exact_match", "token_f1", "bleu")


def validation_record(rs: RunState, step: int) -> dict:
    """{"step", "valid/<name>/loss", ".../ppl", ".../ppl_vs_base", SFT metrics}: equal on every rank."""
    out = {"step": step}
    if rs.classify:
        out.update(classify.validation_record(rs))
        return out
    topo, mb, device = rs.topo, rs.cfg.train.micro_batch_size, rs.engine.device
    for name, windows in rs.valid.items():
        if rs.sft:
            res = sft_evaluate(rs.engine, windows, rs.tokenizer, rs.cfg.sft, mb, topo, device)
            out.update({f"valid/{name}/{k}": v for k, v in res.items() if k != "tokens"})
        elif isinstance(windows, DocumentWindows):
            sums, counts = position_sums(rs.engine, windows, mb, topo, device)
            out.update(loss_and_ppl(f"valid/{name}", float(sums.sum()), int(counts.sum())))
            for b in bucket(sums, counts, windows.width)["buckets"]:
                key = f"valid/{name}/{bucket_name(b['start'], b['end'])}"
                out.update({f"{key}/loss": b["loss"], f"{key}/ppl": b["ppl"]})
        else:
            if rs.pipe_run is not None:
                loss_sum, count = rs.pipe_run.evaluate(windows, mb)
            else:
                loss_sum, count = window_loss(rs.engine, windows, mb, topo, device)
            out.update(loss_and_ppl(f"valid/{name}", loss_sum, count))
        if name in rs.base_valid:
            out[f"valid/{name}/ppl_vs_base"] = out[f"valid/{name}/ppl"] / rs.base_valid[name]
    return out


def loss_and_ppl(key: str, loss_sum: float, count: int) -> dict:
    loss = loss_sum / max(count, 1)
    return {f"{key}/loss": loss, f"{key}/ppl": math.exp(min(loss, 700))}


def evaluate_base(rs: RunState) -> None:
    """The base model at step 0: the perplexities and task metrics later evaluations are compared with."""
    rec = evaluation_record(rs, 0, bool(rs.valid), rs.task_eval is not None)
    rs.base_valid = {n: rec[f"valid/{n}/ppl"] for n in rs.valid if f"valid/{n}/ppl" in rec}
    rs.logger.log(rec)
    if rs.early_stopper is not None:
        rs.early_stopper.after_eval(rec, rs.logger, can_stop=False)  # the base model sets the first best
    rs.say("base model: " + describe(rs, rec))


def window_settings(cfg: dict) -> dict:
    """What each validation set's windows (hence its base perplexity) depend on, from a config
    dict (this run's, or the one saved in a checkpoint): {name: [path, seq_len, documents, tokens]}.
    The bucket width is not among them: it splits the same windows differently."""
    d = cfg["data"]
    tokens = d.get("valid_tokens") if cfg.get("task", "cpt") != "sft" else None
    return {v["name"]: [v["path"], v.get("seq_len") or d["seq_len"], bool(v.get("by_position")), tokens]
            for v in d.get("valid", [])}


def restore_base(rs: RunState, state: dict) -> None:
    """The base model's perplexities from a checkpoint, but not those of a set whose windows
    changed since (data.valid and data.valid_tokens may change on resume): ppl_vs_base would
    compare different tokens, so it is not logged for that set."""
    rs.base_valid = dict(state.get("base_valid") or {})
    if not rs.base_valid or "config" not in state:
        return
    old, new = window_settings(state["config"]), window_settings(rs.cfg.to_dict())
    changed = [n for n in rs.base_valid if n in new and old.get(n) != new[n]]
    for n in changed:
        del rs.base_valid[n]
    if changed:
        rs.say(f"note: the windows of data.valid {', '.join(changed)} changed since the base model was measured: "
               f"valid/<name>/ppl_vs_base is not logged for {'them' if len(changed) > 1 else 'it'}")


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
    parts += [f"{n} loss={rec[f'valid/{n}/loss']:.4f} acc={rec[f'valid/{n}/accuracy']:.3f} "
              f"macro_f1={rec[f'valid/{n}/macro_f1']:.3f}" for n in rs.valid if f"valid/{n}/accuracy" in rec]
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


def position_sums(engine, dw: DocumentWindows, mb: int, topo, device) -> tuple[np.ndarray, np.ndarray]:
    """Loss sum and token count per input position over a by-position set, split over
    data-parallel ranks like window_loss (every rank makes the same number of forward calls).

    Each micro-batch is right-padded to its longest window (rounded up to PAD_MULTIPLE × tp);
    padded positions carry IGNORE labels, and under the causal mask real positions never see them.
    """
    windows = dw.windows
    mine = windows[topo.grad_rank::topo.grad_size]  # context-parallel ranks too: CP is off here
    per_rank = -(-len(windows) // topo.grad_size)
    calls = -(-per_rank // mb)
    sums, counts = np.zeros(dw.seq_len, np.float64), np.zeros(dw.seq_len, np.int64)
    multiple = PAD_MULTIPLE * topo.tp_size
    was_training = engine.training
    engine.eval()
    with torch.no_grad():
        for c in range(calls):
            chunk = mine[c * mb : (c + 1) * mb]
            dummy = not chunk
            chunk = chunk or windows[-1:]  # a rank out of windows: the shortest one, all labels ignored
            n = min(-(-(max(len(w) for w in chunk) - 1) // multiple) * multiple, dw.seq_len)
            ids = np.zeros((len(chunk), n + 1), np.int64)
            real = np.zeros((len(chunk), n), bool)
            for r, w in enumerate(chunk):
                ids[r, : len(w)] = w
                real[r, : len(w) - 1] = not dummy
            t = torch.from_numpy(ids)
            labels = t[:, 1:].masked_fill(torch.from_numpy(~real), IGNORE)
            loss = engine(t[:, :-1].to(device), labels=labels.to(device), reduction="none")
            accumulate(sums, counts, loss.double().cpu().numpy(), real)
    if was_training:
        engine.train()
    total = torch.from_numpy(np.concatenate([sums, counts.astype(np.float64)]))
    dist.all_reduce(total, group=topo.grad_group)
    return total[: dw.seq_len].numpy(), total[dw.seq_len :].numpy().astype(np.int64)


def latest_perplexities(run_dir: Path) -> dict:
    """Latest validation ppl per domain from metrics.jsonl."""
    final = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            for k, v in rec.items():
                parts = k.split("/")
                if len(parts) == 3 and parts[0] == "valid" and parts[2] == "ppl":  # not a bucket's
                    final[parts[1]] = v
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

"""Downstream task metrics during training (`eval.tasks`): lm-evaluation-harness tasks run on the
training engine itself, at step 0 (the base model) and every `eval.tasks.interval` steps.

Every rank runs lm-eval on the same task list; the model wrapper (eval/harness.py) scores each
data-parallel rank's share of the requests and gathers the rest, so lm-eval computes the same
metrics everywhere; rank 0's are broadcast so that the record (and an early-stopping decision on
it) is identical on every rank. `task/<name>/<metric>_vs_base` is the difference from the base
model's value (accuracy points lost or gained; for perplexity-like metrics, the change), which
is what forgetting and learning are read from.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch.distributed as dist

from megacpt.errors import UserError
from megacpt.eval import contamination
from megacpt.eval.tasks import (TaskSpec, check_lengths, eos_ids, evaluate_tasks, hf_tokenizer, load_tasks,
                                 summarize)
from megacpt.train.state import RunState


@dataclass
class TaskEval:
    spec: TaskSpec
    tasks: object  # eval/tasks.py LoadedTasks (data loaded once)
    tokenizer: object
    tokenizer_dir: str
    interval: int
    lm: object = None  # MegacptLM over the engine, made once the engine exists

    def yaml_paths(self) -> dict[str, str]:
        """{task name: its YAML file} for the tasks defined in a file (groups: their include path)."""
        index = self.tasks.manager.task_index
        return {n: str(index[n].yaml_path if n in index and index[n].yaml_path else self.spec.include_path)
                for n in self.spec.names}


def prepare(rs: RunState) -> None:
    """Load the tasks and the tokenizer before any rank starts (a bad task exits 2 right away)."""
    t = rs.cfg.eval.tasks
    if t is None:
        return
    spec = TaskSpec(tuple(t.names), t.include_path, t.num_fewshot, t.limit)
    source = rs.start.source_dir
    tokenizer = hf_tokenizer(f"eval.tasks (model {source})", source, t.tokenizer)
    tasks = load_tasks(spec)
    check_lengths(tasks, rs.args.max_position_embeddings)
    rs.task_eval = TaskEval(spec, tasks, tokenizer, str(t.tokenizer or source), t.interval or rs.cfg.train.eval_interval)


def overlap_warnings(rs: RunState) -> list[str]:
    """One line per validation set or task sharing 13-grams with the training mixture (above 1 % of
    its items; up to 20M tokens of each source scanned: eval/contamination.py). A check that cannot
    run (e.g. task items in another vocabulary) is itself one warning: it never stops the run."""
    cfg = rs.cfg
    if rs.sft or rs.classify:  # JSON Lines of examples, not token shards: nothing to scan n-grams of
        return []
    train = {s.name: s.path for s in cfg.data.train}
    for p in cfg.phases:
        train.update({f"{p.name}/{s.name}": s.path for s in (p.data.train if p.data else [])})
    evals = {f"valid/{v.name}": v.path for v in cfg.data.valid}
    te = rs.task_eval
    if te is not None:
        evals.update({f"task/{n}": path for n, path in te.yaml_paths().items()})
    if not evals:
        return []
    try:
        found = contamination.overlap_warnings(train, evals, tokenizer=te.tokenizer_dir if te else None)
    except UserError as e:
        return [f"contamination check skipped: {e}"]
    return [f"{line}; see megacpt contamination" for line in found]


def attach(rs: RunState) -> None:
    """Wrap the engine as an lm-eval model (once the engine exists)."""
    from megacpt.eval.harness import MegacptLM, Spread  # wraps lm-eval (optional: only with eval.tasks)

    te, topo = rs.task_eval, rs.topo
    sp = rs.cfg.parallel.sequence_parallel
    # Whole sequences on every rank (no cp in lm-eval's forwards): context-parallel ranks take
    # requests as data-parallel ones do.
    spread = Spread(topo.grad_rank, topo.grad_size, topo.grad_group, distributed=True,
                    seq_multiple=topo.tp_size if sp else 1)
    te.lm = MegacptLM(rs.engine, te.tokenizer, rs.args.max_position_embeddings,
                      batch_size=rs.cfg.eval.tasks.batch_size, spread=spread, device=rs.engine.device,
                      eos_ids=eos_ids(rs.hf_cfg, rs.start.source_dir))


def due(rs: RunState, step: int) -> bool:
    te = rs.task_eval
    return te is not None and (step % te.interval == 0 or step == rs.total_steps)


def task_record(rs: RunState) -> dict:
    """{"task/<name>/<metric>": value, ..._vs_base} at the current step; equal on every rank."""
    te = rs.task_eval
    was_training = rs.engine.training
    rs.engine.eval()
    # lm-eval's progress bars (a set per rank) would bury the training log: its stderr is captured
    # and rank 0 passes on the lines that are not progress bars (warnings, errors).
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        raw = evaluate_tasks(te.lm, te.spec, te.tasks, bootstrap_iters=0, verbosity=None)  # no stderrs logged
    if was_training:
        rs.engine.train()
    for line in captured.getvalue().split("\n"):  # tqdm redraws with \r: such lines are bars
        if line.strip() and "\r" not in line and "it/s]" not in line:
            rs.say(f"lm-eval: {line.strip()}")
    # lm-eval builds its results on rank 0 of each node only (LOCAL_RANK 0): rank 0's are the ones.
    box = [summarize(raw) if rs.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    rec = {}
    for name, metrics in box[0].items():
        for metric, value in metrics.items():
            if metric != "n" and "_stderr" not in metric:
                rec[f"task/{name}/{metric}"] = value
    _check_metric(rs, rec)
    if rs.step == 0 and not rs.base_tasks:
        rs.base_tasks = dict(rec)  # no _vs_base at step 0, as for ppl_vs_base
        return rec
    for key, value in list(rec.items()):
        if key in rs.base_tasks:
            rec[f"{key}_vs_base"] = value - rs.base_tasks[key]
    return rec


def _check_metric(rs: RunState, rec: dict) -> None:
    """An early-stopping task metric that the tasks do not log would never stop anything: say so
    at the first task evaluation (every rank has the same record, so every rank stops)."""
    es = rs.cfg.train.early_stopping
    if es is None or not es.metric.startswith("task/"):
        return
    name = es.metric[:-len("_vs_base")] if es.metric.endswith("_vs_base") else es.metric
    if name not in rec:
        raise UserError(f"train.early_stopping.metric {es.metric!r}: the tasks log {', '.join(sorted(rec))}; "
                        f"pick one of those")


def settings(rs: RunState) -> dict | None:
    """What the base values depend on (saved beside them in checkpoints)."""
    te = rs.task_eval
    if te is None:
        return None
    s = te.spec
    return {"names": list(s.names), "include_path": s.include_path, "num_fewshot": s.num_fewshot, "limit": s.limit,
            "tokenizer": te.tokenizer_dir}


def restore_base(rs: RunState, state: dict) -> None:
    """The base model's task values from a checkpoint, unless the task settings changed since:
    then _vs_base would compare different item sets, and it is not logged."""
    rs.base_tasks = state.get("base_tasks") or {}
    if rs.base_tasks and state.get("base_tasks_settings") != settings(rs):
        rs.say("note: eval.tasks changed since the base model was measured: task/*_vs_base is not logged")
        rs.base_tasks = {}

"""lm-evaluation-harness tasks on megacpt's model: loading them (with one-line errors for what
lm-eval would report as a traceback) and reducing its results to {task: {metric: value, "n": items}}.

Tasks are lm-eval's own YAML. Only the include path is indexed unless a name is not found there
(indexing lm-eval's ~15k built-in tasks takes seconds, and every built-in task downloads its data,
which these machines cannot). Results do not depend on the process: lm-eval's seeds are fixed by
`simple_evaluate`, and the RNG states it reseeds are restored afterwards, so evaluating inside a
training run does not change what the run computes next.
"""

from __future__ import annotations

import difflib
import json
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from megacpt.errors import UserError
from megacpt.eval.task_yaml import parse_task_yaml

LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}
LOCAL_HINT = ("give a local copy: dataset_path: json with dataset_kwargs: {data_files: {test: /abs/path/items.jsonl}} "
              "and test_split: test")


@dataclass(frozen=True)
class TaskSpec:
    names: tuple[str, ...]
    include_path: str | None = None
    num_fewshot: int | None = None  # None: each task's own default (0 if it names none)
    limit: int | None = None


def _malformed_yaml(include_path: str | None) -> list[str]:
    found = []
    root = Path(include_path) if include_path else None
    files = ([root] if root and root.is_file() else sorted(root.rglob("*.yaml"))) if root and root.exists() else []
    for f in files:
        try:
            parse_task_yaml(f.read_text())
        except yaml.YAMLError as e:
            found.append(f"{f}: malformed task YAML ({' '.join(str(e).split())[:160]}); fix the file")
    return found


def _lm_eval():
    try:
        import lm_eval  # lm-eval: optional, imported only when tasks are evaluated
        import lm_eval.tasks
    except ImportError:
        raise UserError("task evaluation needs lm-evaluation-harness: pip install lm-eval==0.4.13 "
                        "(or pip install 'megacpt[eval]')") from None
    return lm_eval


def task_manager(spec: TaskSpec):
    """A TaskManager that knows every requested name, or a one-line error saying which is unknown."""
    TaskManager = _lm_eval().tasks.TaskManager

    if spec.include_path and not Path(spec.include_path).exists():
        raise UserError(f"--include-path {spec.include_path} does not exist; pass the folder of your task YAML files")
    tm = TaskManager(include_path=spec.include_path, include_defaults=False) if spec.include_path else None
    if tm is None or any(n not in tm.all_tasks for n in spec.names):
        problems = _malformed_yaml(spec.include_path)  # lm-eval skips a file it cannot parse: say so
        if problems:
            raise UserError(problems[0])
        tm = TaskManager(include_path=spec.include_path)
    for name in spec.names:
        if name not in tm.all_tasks:
            close = difflib.get_close_matches(name, tm.all_tasks, n=3)
            where = f" in {spec.include_path} or" if spec.include_path else ""
            raise UserError(f"unknown task {name!r}: not defined{where} among lm-eval's tasks"
                            + (f"; did you mean {', '.join(close)}?" if close else "; check --include-path"))
    return tm


def _load_one(tm, name: str):
    try:
        loaded = tm.load([name])
    except (ConnectionError, FileNotFoundError, OSError) as e:
        path = tm.task_index[name].yaml_path if name in tm.task_index else name
        raise UserError(f"task {name}: its data is not available offline ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}); {LOCAL_HINT} (in {path})") from None
    except Exception as e:  # lm-eval raises many types for a bad definition: report it in one line
        raise UserError(f"task {name}: invalid task definition ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:160]}); fix its YAML") from None
    if name in loaded["groups"]:
        return [loaded["groups"][name]], loaded["tasks"]
    if name in loaded["tasks"]:
        return [loaded["tasks"][name]], loaded["tasks"]
    return list(loaded["tasks"].values()), loaded["tasks"]  # a tag: the tasks it names


def _check_fewshot(task, k: int | None) -> None:
    own = task.get_config("num_fewshot")
    k = own if k is None or own == 0 else k  # lm-eval keeps a task's explicit 0 whatever is asked
    if not k:
        return
    pool = task.fewshot_docs()
    # lm-eval leaves the item itself out when the shots come from the split being evaluated.
    cfg = task.fewshot_cfg
    same = (cfg.split if cfg is not None else None) == task.config.test_split or not (
        task.config.fewshot_split or task.has_training_docs() or task.has_validation_docs())
    room = len(pool) - (1 if same else 0) if pool is not None else 0
    if k > room:
        raise UserError(f"task {task.config.task}: {k}-shot needs {k} examples but its few-shot pool has {room}; "
                        f"lower --num-fewshot or add a fewshot_split with more examples")


@dataclass
class LoadedTasks:
    manager: object  # the TaskManager (simple_evaluate would index all of lm-eval's tasks without it)
    objects: list  # lm-eval Task/Group objects, one per name, data loaded once


def load_tasks(spec: TaskSpec) -> LoadedTasks:
    """The lm-eval tasks of spec.names, data loaded once and reused by every evaluation."""
    tm = task_manager(spec)
    objs = []
    for name in spec.names:
        built, leaves = _load_one(tm, name)
        for task in leaves.values():
            _check_fewshot(task, spec.num_fewshot)
            _check_generation(task)
        objs.extend(built)
    return LoadedTasks(tm, objs)


# What megacpt's greedy generation honours; hf would pass anything else to generate().
GREEDY_KEYS = {"until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature"}


def _check_generation(task) -> None:
    if task.get_config("output_type") != "generate_until":
        return
    kwargs = task.get_config("generation_kwargs") or {}
    name = task.config.task
    if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
        raise UserError(f"task {name}: asks for sampled generation (do_sample/temperature); megacpt evaluates with "
                        f"greedy decoding only: set do_sample: false, temperature: 0")
    other = sorted(set(kwargs) - GREEDY_KEYS)
    if other:
        raise UserError(f"task {name}: generation_kwargs {', '.join(other)} are not supported (greedy decoding with "
                        f"until and max_gen_toks only); remove them")


def check_lengths(tasks: LoadedTasks, max_length: int) -> None:
    """Generation budgets that leave no room for a prompt in the model's length: a one-line error now."""
    for obj in tasks.objects:
        leaves = obj.get_all_tasks() if hasattr(obj, "get_all_tasks") else [obj]
        for task in leaves:
            kwargs = task.get_config("generation_kwargs") or {}
            max_new = kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", 256))
            if task.get_config("output_type") == "generate_until" and int(max_new) >= max_length:
                raise UserError(f"task {task.config.task}: max_gen_toks {max_new} leaves no room for a prompt in the "
                                f"model's {max_length} positions; lower it")


@contextmanager
def _rng_preserved():
    """simple_evaluate reseeds random, numpy and torch: put the caller's states back afterwards."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def evaluate_tasks(lm, spec: TaskSpec, tasks: LoadedTasks, bootstrap_iters: int = 1000,
                   verbosity: str | None = "WARNING") -> dict | None:
    """lm-eval's raw results dict. lm-eval builds it only where LOCAL_RANK is 0 (else None).
    verbosity None leaves lm-eval's logging set-up alone (it would bind its handler to the
    sys.stderr of the moment)."""
    lm_eval = _lm_eval()
    with _rng_preserved():
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks.objects), task_manager=tasks.manager,
                                       num_fewshot=spec.num_fewshot, limit=spec.limit,
                                       bootstrap_iters=bootstrap_iters, log_samples=True, verbosity=verbosity)


def summarize(results: dict) -> dict:
    """{task: {metric: value, "n": items}}: metric names as lm-eval writes them without the
    ",none" filter suffix (other filters keep theirs after a slash: exact_match/strict-match)."""
    out = {}
    for name, row in results["results"].items():
        metrics = {}
        for key, value in row.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            metrics[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
        samples = results.get("n-samples", {}).get(name)
        metrics["n"] = int(samples["effective"]) if samples else sum(
            int(results["n-samples"][t]["effective"]) for t in results.get("group_subtasks", {}).get(name, ())
            if t in results.get("n-samples", {}))
        out[name] = metrics
    return out


def hf_tokenizer(model_path, source_dir, override: str | None = None):
    """The HF tokenizer task prompts are encoded with: --tokenizer, else the model's own files."""
    from transformers import AutoTokenizer  # heavy (seconds): only task evaluation needs it

    where = override or source_dir
    if not where or not Path(where).is_dir() or not any(
            (Path(where) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise UserError(f"{model_path}: no tokenizer files found (looked in {where}); pass --tokenizer HF_DIR "
                        f"(eval.tasks.tokenizer in a config)")
    return AutoTokenizer.from_pretrained(str(where))


def eos_ids(hf_cfg: dict, source_dir) -> set[int]:
    """EOS ids generation stops at, as `transformers` generate() does: generation_config.json's
    when the model has one, else config.json's."""
    gen = Path(source_dir) / "generation_config.json" if source_dir else None
    cfg = json.loads(gen.read_text()) if gen is not None and gen.is_file() else {}
    ids = cfg.get("eos_token_id", hf_cfg.get("eos_token_id"))
    return set(ids if isinstance(ids, list) else [ids] if ids is not None else [])

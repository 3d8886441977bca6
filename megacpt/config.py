"""Typed run configuration: YAML in (safe_load), `--set a.b=c` overrides, unknown keys rejected.

The dataclasses below are the schema and the documentation of every key: each field carries a
one-line description (`help` in its metadata), which `describe_config()` lists with the key's
type and default (`megacpt train --help-config`). Values are checked against the field types when
loaded (YAML 1.1 reads `1e-4` as a string: numbers written that way are accepted for float
fields). A loaded Config is never mutated; derived values (world size, accumulation steps) live in
`Derived`, computed separately.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from megacpt.errors import ConfigError
from megacpt.positions import BUCKET_METRICS, bucket_name, spans


def _field(default=MISSING, help: str = "", *, factory=MISSING, key: str | None = None):
    """A config field with its one-line description (listed by describe_config). `key`: the YAML
    key when it is not a Python name (`checkpoint.async`; the field is then `async_`)."""
    meta = {"help": help} if key is None else {"help": help, "key": key}
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _as_dict(obj):
    """dataclasses.asdict, with each field under its YAML key."""
    if dataclasses.is_dataclass(obj):
        return {_key(f): _as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_dict(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _as_dict(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


@dataclass(frozen=True)
class ModelConfig:
    init_from: Optional[str] = _field(None, "HF model dir or megacpt run/checkpoint dir to start from: weights only "
                                            "(a resume ignores it)")
    max_seq_len: Optional[int] = _field(None, "long-context override of max_position_embeddings, written into "
                                              "exported configs (rope_type dynamic: its own start is exported "
                                              "instead); null: the model's")
    rope_theta: Optional[float] = _field(None, "long-context override of the RoPE base; null: the model's")
    rope_scaling: Optional[dict] = _field(
        None, "long-context RoPE scaling, transformers' keys: {rope_type: linear|dynamic|yarn|llama3|longrope, "
              "factor: F, ...}; yarn also beta_fast, beta_slow, attention_factor, mscale, mscale_all_dim, truncate; "
              "llama3 low_freq_factor, high_freq_factor; longrope short_factor, long_factor; "
              "original_max_position_embeddings defaults to the model's original context; null: the model's")
    # rope_theta/rope_scaling change the full-attention layers only (Gemma 3's sliding layers keep
    # their own base, which a long context does not reach through the window).
    local_rope_theta: Optional[float] = _field(None, "override of the RoPE base of the sliding-window layers "
                                                     "(Gemma 3: 10k); null: the model's")
    dropout: Optional[float] = _field(None, "dropout in training (never in evaluation) on the attention "
                                            "probabilities and on each block's attention and MLP outputs; exported "
                                            "as attention_dropout (Phi-3: also resid_pdrop); null: the HF config's "
                                            "(usually 0)")
    activation_checkpointing: bool = _field(False, "recompute each decoder block's activations in the backward "
                                                   "instead of keeping them")
    # After TP and activation checkpointing, before the engine (train/parallelize.py). Under ZeRO-3
    # only the blocks' pointwise code (RMSNorm, RoPE, SwiGLU): the per-module gather hooks would
    # break a compiled block.
    compile: bool = _field(False, "torch.compile each decoder block (under ZeRO-3 its pointwise code only, "
                                  "see compile_pointwise)")


@dataclass(frozen=True)
class TrainSource:
    name: str = _field(help="source name, unique: metrics count its tokens as tokens/NAME; seeds its data order")
    path: str = _field(help="shard prefix or directory of shards (megacpt prepare); task sft: a .jsonl file or "
                            "a directory of them")
    weight: float = _field(1.0, "share of the training samples, relative to the other sources' weights")


@dataclass(frozen=True)
class ValidSource:
    name: str = _field(help="set name, unique: metrics are valid/NAME/loss, /ppl, /ppl_vs_base, ...")
    path: str = _field(help="held-out shard prefix or directory; task sft: a .jsonl file or a directory of them")
    seq_len: Optional[int] = _field(None, "this set's window length in tokens (task cpt); null: data.seq_len")
    by_position: Optional[int] = _field(
        None, "bucket width in tokens (task cpt): one window per document from its start, and the loss per bucket "
              "of positions as valid/NAME/pos_START_END/loss and /ppl besides the set's own; null: off")


@dataclass(frozen=True)
class DataConfig:
    seq_len: int = _field(512, "tokens per training sequence")
    train: list[TrainSource] = _field(help="training sources of the main phase, blended by weight", factory=list)
    valid: list[ValidSource] = _field(help="held-out sets evaluated every train.eval_interval steps", factory=list)
    valid_tokens: int = _field(8192, "input tokens evaluated per validation set at most (task cpt)")
    document_mask: bool = _field(False, "attention and positions restart at each document")
    mask_eos_loss: bool = _field(False, "do not train on predicting the token after an EOS")


@dataclass(frozen=True)
class ScheduleConfig:
    kind: Literal["cosine", "linear", "wsd", "constant"] = _field(
        "cosine", "LR schedule after the warm-up: cosine or linear decay to optim.min_lr, wsd (stable, then decay), "
                  "or constant")
    warmup_steps: int = _field(10, "steps of linear warm-up to the peak LR")
    decay_fraction: float = _field(0.1, "wsd: share of steps spent decaying")
    decay_shape: Literal["linear", "1-sqrt"] = _field("1-sqrt", "wsd: shape of the decay to optim.min_lr")


@dataclass(frozen=True)
class PhaseData:
    train: list[TrainSource] = _field(help="the phase's training sources, blended by weight", factory=list)


@dataclass(frozen=True)
class PhaseConfig:
    name: str = _field(help="phase name, unique: logged with each step; seeds the phase's data order")
    steps: int = _field(help="optimizer steps of the phase, after those of the phases before it")
    data: Optional[PhaseData] = _field(None, "the phase's data; null: the previous phase's mixture")
    schedule: Optional[ScheduleConfig] = _field(None, "the phase's LR schedule; null: the top-level schedule")
    lr: Optional[float] = _field(None, "the phase's peak LR; null: the top-level optim.lr")
    min_lr: Optional[float] = _field(None, "the phase's final LR; null: the top-level optim.min_lr")
    trainable: Optional[Literal["all", "embeddings"]] = _field(None, "what the phase trains; null: train.trainable")
    seq_len: Optional[int] = _field(None, "tokens per training sequence in this phase (e.g. a long-context phase); "
                                          "null: the previous phase's (data.seq_len for the first)")
    micro_batch_size: Optional[int] = _field(None, "sequences per rank in one forward/backward in this phase; "
                                                   "null: the previous phase's")
    global_batch_size: Optional[int] = _field(None, "sequences per optimizer step in this phase (keep tokens per "
                                                    "step constant by halving it when seq_len doubles); null: the "
                                                    "previous phase's")


@dataclass(frozen=True)
class EarlyStoppingConfig:
    metric: str = _field(help="a validation or task metric, e.g. valid/new/loss, valid/sft/exact_match or "
                              "task/my_probe/acc")
    patience: int = _field(3, "evaluations in a row without improvement before stopping")
    min_delta: float = _field(0.0, "an improvement must beat the best value by more than this")
    mode: Optional[Literal["min", "max"]] = _field(None, "whether lower or higher is better; null: max for "
                                                         "exact_match/token_f1/bleu and task metrics other than "
                                                         "perplexities, else min")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _field(100, "optimizer steps of the main phase (phases follow it)")
    micro_batch_size: int = _field(1, "sequences per rank in one forward/backward")
    global_batch_size: int = _field(8, "sequences per optimizer step over all data-parallel ranks "
                                       "(gradient accumulation makes up the rest)")
    eval_interval: int = _field(20, "steps between validations (and at the last step)")
    log_interval: int = _field(1, "steps between metrics lines (and at the last step)")
    stop_after: Optional[int] = _field(None, "end this invocation cleanly after N steps, checkpoint first (like a "
                                             "job time limit); null: run to the end")
    eval_at_start: bool = _field(True, "measure the base model before the first step")
    nonfinite: Literal["rollback", "stop"] = _field("rollback", "what to do on a NaN/inf loss or gradient norm")
    max_rollbacks: int = _field(3, "rollbacks (each skipping the offending batch) before giving up")
    spike_factor: float = _field(3.0, "log a loss_spike event when loss > factor × median of the last 50; 0: off")
    collective_timeout_s: float = _field(1800.0, "a rank that stops participating fails the others after this")
    # Right after extend-vocab, for example: the new rows settle in while the rest stays as it was.
    trainable: Literal["all", "embeddings"] = _field(
        "all", "embeddings: only embed_tokens (and an untied lm_head) learn in the main phase, the rest keeps its "
               "weights bit for bit; phases may override it")
    freeze: list[str] = _field(
        help="parameters that never train, fixed for the whole run: fnmatch patterns over HF parameter names "
             "(model.layers.*.mlp.*, lm_head.weight) or megacpt's (without model.), layer ranges layers.0-5, "
             "and backbone (task: classify: all but the head, a linear probe)",
        factory=list)
    early_stopping: Optional[EarlyStoppingConfig] = _field(None, "stop when a validation metric stops improving; "
                                                                 "null: off")
    # caching is faster (no page faults on fresh buffers every step), but the resident set stays
    # at its peak; see megacpt/train/cpu_alloc.py.
    cpu_allocator: Literal["caching", "system"] = _field(
        "caching", "CPU ranks only: caching (glibc malloc keeps freed blocks for reuse) or system (malloc's defaults)")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = _field(1.0e-4, "peak learning rate (AdamW)")
    min_lr: float = _field(1.0e-5, "learning rate at the end of the decay")
    weight_decay: float = _field(0.1, "AdamW weight decay")
    grad_clip: float = _field(1.0, "clip the global gradient norm to this (DeepSpeed gradient_clipping; 0: off)")
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.95, "AdamW beta2")
    eps: float = _field(1.0e-8, "AdamW epsilon")
    layer_lr_decay: Optional[float] = _field(
        None, "layer-wise LR decay d in (0, 1]: block i of L gets LR × d^(L - i), embed_tokens × d^(L + 1), the final "
              "norm and lm_head (and a tied embedding, which is the head) the full LR; null: off")
    embedding_lr: Optional[float] = _field(
        None, "peak LR of embed_tokens and an untied lm_head, same schedule scaled by embedding_lr / lr (phases "
              "with their own lr too); null: optim.lr")


@dataclass(frozen=True)
class ParallelConfig:
    zero_stage: int = _field(3, "DeepSpeed ZeRO stage, 0-3: how much of the training state is partitioned over "
                                "data-parallel ranks")
    tp: int = _field(1, "tensor-parallel size")
    pp: int = _field(1, "pipeline-parallel stages")
    pp_balance: str = _field("parameters", "how pipeline stages are balanced: parameters (embedding and head "
                                           "counted) or layers")
    sequence_parallel: bool = _field(False, "Megatron sequence parallelism inside the tensor group (norms and "
                                            "residuals on seq_len/tp positions)")
    cp: int = _field(1, "context-parallel size: each training sequence split over cp ranks (DeepSpeed-Ulysses: "
                        "seq_len/cp positions per rank, attention by heads); data-parallel size = world / (tp × pp × cp)")


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = _field(50, "steps between checkpoints")
    keep: int = _field(2, "newest checkpoints kept")
    # Benchmarks turn it off: a 1B model's final ZeRO checkpoint is ~17 GB of disk and tens of
    # seconds that are not training.
    final: bool = _field(True, "save a checkpoint when the last step is done")
    async_: bool = _field(False, "write checkpoints in the background from a snapshot in host memory (a second "
                                 "copy of each rank's checkpoint state): training goes on while the files are "
                                 "written, and a checkpoint is published once every rank's files are",
                          key="async")


@dataclass(frozen=True)
class SFTConfig:
    tokenizer: Optional[str] = _field(None, "tokenizer dir (and chat template); null: the model's HF dir")
    eval_examples: int = _field(32, "held-out examples generated per set for exact_match/token_f1/bleu; "
                                    "0: loss only")
    max_new_tokens: int = _field(64, "greedy generation length limit")
    eval_batch_size: int = _field(8, "prompts generated together per rank")
    bleu: bool = _field(True, "sacrebleu corpus BLEU of the generations (generation tasks)")


@dataclass(frozen=True)
class ClassifyConfig:
    labels: list[str] = _field(help="the label names in head order; empty: the sorted labels of the training files",
                               factory=list)
    tokenizer: Optional[str] = _field(None, "tokenizer dir; null: the model's HF dir")
    gap_examples: int = _field(256, "training examples evaluated (in eval mode) beside each held-out set, for "
                                    "the train-vs-held-out loss gap; 0: off")


@dataclass(frozen=True)
class TasksConfig:
    names: list[str] = _field(help="lm-evaluation-harness task (or group) names, e.g. [my_cloze, my_choice]")
    include_path: Optional[str] = _field(None, "folder of lm-eval task YAML files (lm-eval's own format)")
    num_fewshot: Optional[int] = _field(None, "few-shot examples per item; null: each task's own default, else 0")
    limit: Optional[int] = _field(None, "evaluate the first N items of each task; null: all")
    interval: Optional[int] = _field(None, "steps between task evaluations (and at the last step); "
                                           "null: train.eval_interval")
    batch_size: int = _field(8, "requests scored together per data-parallel rank")
    tokenizer: Optional[str] = _field(None, "HF tokenizer dir for the task prompts; null: the model's own files")


@dataclass(frozen=True)
class EvalConfig:
    tasks: Optional[TasksConfig] = _field(None, "lm-eval tasks evaluated at step 0 (the base) and every interval, "
                                                "logged as task/<name>/<metric> and task/<name>/<metric>_vs_base")


# The decoder-block projections, by their last name component (PEFT's target_modules style).
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterConfig:
    kind: Literal["lora"] = _field("lora", "lora: each targeted linear learns a low-rank update y = W x + B A x · "
                                           "alpha/r, its own weight frozen (PEFT's LoRA)")
    r: int = _field(8, "rank of the update: A is r × in_features, B out_features × r")
    alpha: float = _field(16.0, "the update is scaled by alpha / r")
    dropout: float = _field(0.0, "dropout on the input of the update, in training only")
    targets: list[str] = _field(help="module-name patterns (fnmatch) over megacpt's names, which are HF's without "
                                     "the model. prefix (layers.3.self_attn.q_proj); a pattern also matches the "
                                     "name's tail after a dot, so q_proj matches every layer's; only the decoder "
                                     "blocks' projections are eligible",
                                factory=lambda: list(LORA_PROJECTIONS))
    modules_to_save: list[Literal["embed_tokens", "lm_head"]] = _field(
        help="modules trained whole next to the adapter and exported as PEFT's modules_to_save (e.g. after "
             "megacpt extend-vocab, for the new rows)", factory=list)


@dataclass(frozen=True)
class LoggingConfig:
    backends: Optional[list[Literal["tensorboard", "wandb", "mlflow"]]] = _field(
        None, "experiment trackers beside metrics.jsonl: tensorboard (run_dir/tensorboard), wandb (offline in "
              "run_dir/wandb unless WANDB_MODE), mlflow (sqlite:///run_dir/mlflow.db unless MLFLOW_TRACKING_URI); "
              "null: [tensorboard] (none with tensorboard: false)")
    project: str = _field("megacpt", "W&B project and MLflow experiment the run is logged under")
    tags: list[str] = _field(help="tags of the W&B and MLflow runs (the task is added)", factory=list)


@dataclass(frozen=True)
class Config:
    run_dir: str = _field("runs/demo", "the run's directory: checkpoints, metrics.jsonl, config.resolved.json; "
                                       "a run with a checkpoint there resumes")
    seed: int = _field(1234, "seed of the data order and of torch's and numpy's random state")
    task: Literal["cpt", "sft", "classify"] = _field(
        "cpt", "cpt: next-token prediction on tokenized shards; sft: prompt/response fine-tuning on .jsonl; "
               "classify: a linear head on the last token's hidden state, {text, label} .jsonl")
    model: ModelConfig = _field(help="the model: where its weights come from, length overrides, speed switches",
                                factory=ModelConfig)
    data: DataConfig = _field(help="training and validation data", factory=DataConfig)
    phases: list[PhaseConfig] = _field(help="stages after the main phase, each with its own steps and optionally "
                                            "data, schedule, LR and trainable parameters", factory=list)
    train: TrainConfig = _field(help="steps, batch sizes, evaluation and fault handling", factory=TrainConfig)
    optim: OptimConfig = _field(help="AdamW and the learning rates", factory=OptimConfig)
    schedule: ScheduleConfig = _field(help="learning-rate schedule of the main phase", factory=ScheduleConfig)
    parallel: ParallelConfig = _field(help="how the model and batch are split over ranks", factory=ParallelConfig)
    precision: Literal["auto", "bf16", "fp32", "fp8"] = _field(
        "auto", "training dtype; auto: bf16 on GPUs, fp32 on CPUs; fp8: a bf16 run whose block linears compute in "
                "float8 (torchao; GPUs of compute capability ≥ 8.9; ZeRO 0-2 without tp, pp or adapter)")
    checkpoint: CheckpointConfig = _field(help="when checkpoints are written and how many are kept",
                                          factory=CheckpointConfig)
    sft: SFTConfig = _field(help="task: sft only: tokenizer and generation-based evaluation", factory=SFTConfig)
    classify: ClassifyConfig = _field(help="task: classify only: labels, tokenizer, the generalisation-gap sample",
                                      factory=ClassifyConfig)
    eval: EvalConfig = _field(help="downstream task evaluation during training (lm-evaluation-harness)",
                              factory=EvalConfig)
    adapter: Optional[AdapterConfig] = _field(None, "train a LoRA adapter instead of the whole model (the base "
                                                    "weights stay frozen); null: full fine-tuning")
    logging: LoggingConfig = _field(help="experiment trackers (TensorBoard, Weights & Biases, MLflow)",
                                    factory=LoggingConfig)
    tensorboard: Optional[bool] = _field(None, "older spelling of tensorboard in logging.backends; null: as "
                                               "logging.backends says")
    deepspeed: dict = _field(help="merged last into the generated DeepSpeed config (offload, bucket sizes, ...)",
                             factory=dict)

    def to_dict(self) -> dict:
        return _as_dict(self)


# ---------------------------------------------------------------------------------------------
# Parsing


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, path: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # Optional[X]: X's own error names the problem (e.g. an unknown key)
            return _coerce(value, members[0], path)
        for a in members:
            try:
                return _coerce(value, a, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{path}: must be one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{path}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value)  # YAML 1.1 reads 1e-4 as a string
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        else:
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(out):
            raise ConfigError(f"{path}: must be finite, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{path}: expected a mapping, got {value!r}")
    raise TypeError(f"unsupported config type {tp} at {path}")


def _from_dict(cls, data, path: str = ""):
    if data is None:
        data = {}
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {_key(f): f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        close = _closest(str(unknown[0]), list(fields))
        hint = f"; did you mean {close!r}?" if close else f"; valid keys here: {', '.join(fields)}"
        raise ConfigError(f"unknown config key {key!r}{hint}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[f.name] = _coerce(data[name], hints[f.name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required key missing")
    return cls(**kwargs)


def _closest(word: str, options: list[str]) -> Optional[str]:
    m = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return m[0] if m else None


def _set_path(tree: dict, dotted: str, value) -> None:
    """Apply one `a.b.0.c=value` override to a plain dict/list tree."""
    keys = dotted.split(".")
    node = tree
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError(f"--set {dotted}: {where} is not an index of a list of {len(node)} items")
            k = int(k)
            if last:
                node[k] = value
            else:
                node = node[k]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[:i])} is not a mapping")
        if last:
            node[k] = value
        else:
            if node.get(k) is None:
                node[k] = {}
            node = node[k]


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"--set {ov!r}: expected key=value, e.g. --set optim.lr=3e-4")
        key, raw = ov.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    tree = copy.deepcopy(data) if data else {}
    parsed = parse_overrides(overrides or [])
    if parsed:
        # Overrides apply on top of the defaults, so `--set data.train.0.weight=…` finds the list.
        tree = _merge_defaults(Config().to_dict(), tree)
    for key, value in parsed:
        _set_path(tree, key, value)
    cfg = _from_dict(Config, tree)
    validate(cfg)
    return cfg


def _merge_defaults(defaults, data):
    if isinstance(defaults, dict) and isinstance(data, dict):
        out = dict(defaults)
        for k, v in data.items():
            out[k] = _merge_defaults(defaults[k], v) if k in defaults else v
        return out
    return data


def load_config(path, overrides: list[str] | None = None) -> Config:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys")
    return config_from_dict(data or {}, overrides)


def _positive(value, name, allow_zero=False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'≥ 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: Config) -> None:
    """Checks that need no files and no world size, in a fixed order (the first failure is reported)."""
    _check_numbers(cfg)
    _check_parallel(cfg)
    _check_batch_and_schedule(cfg)
    _check_sources(cfg)
    _check_valid(cfg)
    _validate_early_stopping(cfg)
    _check_sft_length(cfg)
    _check_phases(cfg)
    _check_tasks(cfg)
    _check_adapter(cfg)
    _check_fp8(cfg)
    _check_logging(cfg)


def tracker_backends(cfg: Config) -> list[str]:
    """The trackers a run writes to: logging.backends, or the top-level `tensorboard:` alias."""
    if cfg.logging.backends is not None:
        return list(cfg.logging.backends)
    return [] if cfg.tensorboard is False else ["tensorboard"]


def _check_logging(cfg: Config) -> None:
    backends = cfg.logging.backends
    if backends is None:
        return
    twice = sorted({b for b in backends if backends.count(b) > 1})
    if twice:
        raise ConfigError(f"logging.backends lists {twice[0]} twice; name each tracker once")
    if cfg.tensorboard is not None and cfg.tensorboard != ("tensorboard" in backends):
        raise ConfigError(f"tensorboard: {str(cfg.tensorboard).lower()} contradicts logging.backends {backends}; "
                          f"drop the top-level tensorboard key (logging.backends replaces it)")


# Model-parallel ranks would draw different masks for activations they must agree on (Megatron
# keeps a separate RNG stream per region for this); not built yet.
DROPOUT_LAYOUTS = ("dropout is not available with tensor, pipeline or context parallelism yet; use ZeRO data "
                   "parallelism, or set model.dropout: 0")


def _check_numbers(cfg: Config) -> None:
    t, d, o = cfg.train, cfg.data, cfg.optim
    for name, v in [
        ("train.steps", t.steps),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.global_batch_size", t.global_batch_size),
        ("train.eval_interval", t.eval_interval),
        ("train.log_interval", t.log_interval),
        ("train.stop_after", t.stop_after),
        ("data.seq_len", d.seq_len),
        ("checkpoint.interval", cfg.checkpoint.interval),
        ("checkpoint.keep", cfg.checkpoint.keep),
        ("parallel.tp", cfg.parallel.tp),
        ("parallel.pp", cfg.parallel.pp),
        ("parallel.cp", cfg.parallel.cp),
        ("optim.lr", o.lr),
    ]:
        _positive(v, name)
    _positive(o.embedding_lr, "optim.embedding_lr")
    _positive(cfg.sft.max_new_tokens, "sft.max_new_tokens")
    _positive(cfg.sft.eval_batch_size, "sft.eval_batch_size")
    _positive(cfg.sft.eval_examples, "sft.eval_examples", allow_zero=True)
    for name, v in [("optim.min_lr", o.min_lr), ("optim.weight_decay", o.weight_decay),
                    ("optim.grad_clip", o.grad_clip), ("data.valid_tokens", d.valid_tokens),
                    ("schedule.warmup_steps", cfg.schedule.warmup_steps)]:
        _positive(v, name, allow_zero=True)
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr ({o.min_lr}) is above optim.lr ({o.lr})")
    if cfg.model.dropout is not None and not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {cfg.model.dropout} (0.1 drops 10 %)")
    par = cfg.parallel
    if cfg.model.dropout and max(par.tp, par.pp, par.cp) > 1:
        raise ConfigError(DROPOUT_LAYOUTS)
    if o.layer_lr_decay is not None and not 0 < o.layer_lr_decay <= 1:
        raise ConfigError(f"optim.layer_lr_decay must be in (0, 1], got {o.layer_lr_decay} (0.8 lowers each layer's "
                          f"LR by 20 % going down from the top)")


def _check_parallel(cfg: Config) -> None:
    par, d = cfg.parallel, cfg.data
    if par.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {par.zero_stage}")
    if par.pp > 1:
        # The pipeline stages are built by megacpt/parallel/pp.py, outside the code paths of these.
        for on, what in ((cfg.model.compile, "model.compile"), (cfg.task == "sft", "task: sft"),
                         (cfg.task == "classify", "task: classify"),
                         (cfg.optim.embedding_lr is not None, "optim.embedding_lr"),
                         (bool(cfg.train.freeze), "train.freeze"),
                         (cfg.optim.layer_lr_decay is not None, "optim.layer_lr_decay"),
                         (cfg.train.trainable != "all" or any(p.trainable not in (None, "all") for p in cfg.phases),
                          "trainable: embeddings")):
            if on:
                raise ConfigError(f"{what} is not available with pipeline parallelism (parallel.pp > 1) yet; "
                                  f"use pp: 1 (tensor parallelism and ZeRO work) or drop {what}")
    if par.sequence_parallel:
        if par.tp < 2:
            raise ConfigError("parallel.sequence_parallel splits positions over the tensor-parallel group: "
                              "set parallel.tp ≥ 2, or turn sequence_parallel off")
        if par.pp > 1:
            raise ConfigError("parallel.sequence_parallel is not available with pipeline parallelism (pp > 1) yet; "
                              "use pp: 1 or turn sequence_parallel off")
        if d.seq_len % par.tp:
            raise ConfigError(f"parallel.sequence_parallel needs data.seq_len ({d.seq_len}) divisible by "
                              f"parallel.tp ({par.tp})")
    if par.sequence_parallel and cfg.task == "sft" and cfg.sft.eval_examples > 0:
        # Greedy generation runs forwards of every length; sequence parallelism needs lengths
        # divisible by tp.
        raise ConfigError("task: sft generations (sft.eval_examples > 0) do not run with parallel.sequence_parallel; "
                          "set sft.eval_examples: 0 or turn sequence_parallel off")
    if par.pp_balance not in ("parameters", "layers"):
        raise ConfigError(f"parallel.pp_balance must be parameters or layers, got {par.pp_balance!r}")
    _check_cp(cfg)


def _check_cp(cfg: Config) -> None:
    """Context parallelism: what it does not combine with, and sequence lengths it can split
    (model-dependent checks, the heads, are parallel/layouts.py's)."""
    cp = cfg.parallel.cp
    if cp == 1:
        return
    works = "context parallelism works with tp, ZeRO 0-3, document masking, activation checkpointing and eval.tasks"
    for on, what in ((cfg.parallel.pp > 1, "pipeline parallelism (parallel.pp > 1)"),
                     (cfg.parallel.sequence_parallel, "parallel.sequence_parallel"), (cfg.task == "sft", "task: sft"),
                     (cfg.task == "classify", "task: classify")):
        if on:
            raise ConfigError(f"parallel.cp={cp} is not available with {what}; use cp: 1 or drop it ({works})")
    lengths = [("data.seq_len", cfg.data.seq_len)]
    # PhaseConfig.seq_len (a phase's own sequence length) where the schema has it.
    lengths += [(f"phases.{i}.seq_len", getattr(p, "seq_len", None)) for i, p in enumerate(cfg.phases)]
    for name, n in lengths:
        if n is not None and n % cp:
            raise ConfigError(f"parallel.cp={cp} splits each sequence into {cp} equal blocks: {name} ({n}) is not "
                              f"divisible by it; use a multiple of {cp}")


def _check_batch_and_schedule(cfg: Config) -> None:
    t = cfg.train
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) is not a multiple of train.micro_batch_size "
            f"({t.micro_batch_size})"
        )
    if not 0 < cfg.schedule.decay_fraction <= 1:
        raise ConfigError(f"schedule.decay_fraction must be in (0, 1], got {cfg.schedule.decay_fraction}")


def _check_sources(cfg: Config) -> None:
    d = cfg.data
    for i, src in enumerate(d.train):
        if not src.weight > 0:
            raise ConfigError(f"data.train.{i} ({src.name}): weight must be > 0, got {src.weight}")
    for group, items in (("data.train", d.train), ("data.valid", d.valid)):
        names = [s.name for s in items]
        if len(set(names)) != len(names):
            raise ConfigError(f"{group}: source names must be unique, got {names}")


def _check_valid(cfg: Config) -> None:
    """A validation set's own window length and by-position buckets (the model's length limit is
    checked by the trainer, which knows max_position_embeddings)."""
    d, par = cfg.data, cfg.parallel
    for i, v in enumerate(d.valid):
        for key, value in (("seq_len", v.seq_len), ("by_position", v.by_position)):
            if value is None:
                continue
            what = f"data.valid.{i}.{key} ({v.name})"
            if value <= 0:
                raise ConfigError(f"{what} must be a positive number of tokens, got {value}; or null for "
                                  f"{'data.seq_len' if key == 'seq_len' else 'no buckets'}")
            if cfg.task != "cpt":
                raise ConfigError(f"{what} applies to task cpt; {cfg.task} validation sets use data.seq_len: "
                                  f"remove it")
            if par.pp > 1 and (key == "by_position" or value != d.seq_len):
                raise ConfigError(f"{what} is not available with pipeline parallelism (parallel.pp > 1) yet; "
                                  f"use pp: 1 or remove it")
        if par.sequence_parallel and v.seq_len and v.seq_len % par.tp:
            raise ConfigError(f"data.valid.{i}.seq_len ({v.name}) {v.seq_len} is not divisible by parallel.tp "
                              f"({par.tp}), which parallel.sequence_parallel needs")


def _check_sft_length(cfg: Config) -> None:
    d = cfg.data
    if "backbone" in cfg.train.freeze and cfg.task != "classify":
        raise ConfigError("train.freeze: backbone freezes all but a classifier's head, for task: classify; name "
                          "the parameters to freeze instead")
    if cfg.task == "classify":
        _positive(cfg.classify.gap_examples, "classify.gap_examples", allow_zero=True)
        sources = list(d.train) + [s for p in cfg.phases if p.data for s in p.data.train]
        if any(s.weight != 1.0 for s in sources):
            raise ConfigError("task: classify pools the examples of all of a phase's sources (no blending by "
                              "weight); drop the weights, or merge the files in the proportions you want")
        if len(set(cfg.classify.labels)) != len(cfg.classify.labels):
            raise ConfigError(f"classify.labels must be unique, got {cfg.classify.labels}")
        if cfg.eval.tasks is not None:
            raise ConfigError("eval.tasks runs language-model tasks, which a classifier has no head for; drop "
                              "eval.tasks or use task: cpt")
        if cfg.parallel.sequence_parallel:
            raise ConfigError("task: classify pools one position per sequence, which sequence parallelism splits "
                              "over ranks; turn parallel.sequence_parallel off")
    if cfg.task == "sft" and cfg.sft.max_new_tokens >= d.seq_len:
        raise ConfigError(f"sft.max_new_tokens ({cfg.sft.max_new_tokens}) must be below data.seq_len ({d.seq_len}): "
                          f"prompt and generation share the sequence")


@dataclass(frozen=True)
class BatchShape:
    """What one phase's optimizer step reads: sequences of seq_len tokens, global_batch_size of them,
    micro_batch_size per rank per forward."""

    phase: str = _field(help="the phase's name (main for the first)")
    steps: int = _field(help="optimizer steps of the phase")
    seq_len: int = _field(help="tokens per training sequence")
    micro_batch_size: int = _field(help="sequences per rank in one forward/backward")
    global_batch_size: int = _field(help="sequences per optimizer step over all data-parallel ranks")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.global_batch_size


def batch_shapes(cfg: Config) -> list[BatchShape]:
    """The main phase's shape, then each declared phase's; a key a phase leaves null keeps the
    previous phase's value."""
    t = cfg.train
    out = [BatchShape("main", t.steps, cfg.data.seq_len, t.micro_batch_size, t.global_batch_size)]
    for p in cfg.phases:
        prev = out[-1]
        out.append(BatchShape(p.name, p.steps, p.seq_len or prev.seq_len, p.micro_batch_size or prev.micro_batch_size,
                              p.global_batch_size or prev.global_batch_size))
    return out


def tokens_at(cfg: Config, step: int) -> int:
    """Training tokens read up to optimizer step `step` (phases may differ in tokens per step)."""
    total, start = 0, 0
    for b in batch_shapes(cfg):
        total += max(0, min(step - start, b.steps)) * b.tokens_per_step
        start += b.steps
    return total + max(0, step - start) * b.tokens_per_step


def _check_phase_shapes(cfg: Config) -> None:
    for i, p in enumerate(cfg.phases):
        for key in ("seq_len", "micro_batch_size", "global_batch_size"):
            _positive(getattr(p, key), f"phases.{i}.{key}")
    shapes = batch_shapes(cfg)
    for i, b in enumerate(shapes[1:]):
        if b.global_batch_size % b.micro_batch_size:
            raise ConfigError(f"phases.{i} ({b.phase}): global_batch_size ({b.global_batch_size}) is not a multiple "
                              f"of micro_batch_size ({b.micro_batch_size})")
        if cfg.parallel.sequence_parallel and b.seq_len % cfg.parallel.tp:
            raise ConfigError(f"phases.{i} ({b.phase}): parallel.sequence_parallel needs seq_len ({b.seq_len}) "
                              f"divisible by parallel.tp ({cfg.parallel.tp})")
    changed = [b.phase for b in shapes[1:] if (b.seq_len, b.micro_batch_size, b.global_batch_size) !=
               (shapes[0].seq_len, shapes[0].micro_batch_size, shapes[0].global_batch_size)]
    if changed and cfg.parallel.pp > 1:
        # The pipeline schedule's activation buffers and micro-batch count are fixed when it is built.
        raise ConfigError(f"phase {changed[0]} changes seq_len or the batch size, which pipeline parallelism "
                          f"(parallel.pp > 1) cannot do mid-run; use pp: 1 (ZeRO and tensor parallelism can), or "
                          f"keep the main phase's seq_len and batch sizes")
    if cfg.task != "cpt" and any(b.seq_len != cfg.data.seq_len for b in shapes):
        raise ConfigError(f"task: {cfg.task} reads every phase at data.seq_len; drop seq_len from the phases")


def _check_phases(cfg: Config) -> None:
    names = [p.name for p in cfg.phases]
    if len(set(names)) != len(names):
        raise ConfigError(f"phases: names must be unique, got {names}")
    _check_phase_shapes(cfg)
    for i, p in enumerate(cfg.phases):
        _positive(p.steps, f"phases.{i}.steps")
        for j, src in enumerate((p.data.train if p.data else [])):
            if not src.weight > 0:
                raise ConfigError(f"phases.{i}.data.train.{j} ({src.name}): weight must be > 0, got {src.weight}")


def _check_tasks(cfg: Config) -> None:
    t = cfg.eval.tasks
    if t is None:
        return
    if not t.names:
        raise ConfigError("eval.tasks.names is empty: list lm-eval task names, or drop eval.tasks")
    _positive(t.interval, "eval.tasks.interval")
    _positive(t.limit, "eval.tasks.limit")
    _positive(t.num_fewshot, "eval.tasks.num_fewshot", allow_zero=True)
    _positive(t.batch_size, "eval.tasks.batch_size")
    if cfg.parallel.pp > 1:
        raise ConfigError("eval.tasks is not available with pipeline parallelism (parallel.pp > 1) yet; use pp: 1 "
                          "(tensor parallelism and ZeRO work), or evaluate checkpoints with megacpt eval --tasks")


def _check_adapter(cfg: Config) -> None:
    """What can be checked without the model (the patterns are matched in megacpt/models/lora.py)."""
    a = cfg.adapter
    if a is None:
        return
    _positive(a.r, "adapter.r")
    _positive(a.alpha, "adapter.alpha")
    if not 0 <= a.dropout < 1:
        raise ConfigError(f"adapter.dropout must be in [0, 1), got {a.dropout}")
    if not a.targets:
        raise ConfigError(f"adapter.targets is empty: list module-name patterns, e.g. {list(LORA_PROJECTIONS)}")
    if len(set(a.modules_to_save)) != len(a.modules_to_save):
        raise ConfigError(f"adapter.modules_to_save repeats a module: {a.modules_to_save}")
    if cfg.parallel.pp > 1:
        raise ConfigError("adapter is not available with pipeline parallelism (parallel.pp > 1); use pp: 1 (tensor "
                          "parallelism and ZeRO work)")
    if cfg.parallel.cp > 1:
        raise ConfigError("adapter is not available with context parallelism (parallel.cp > 1) yet (untested); use "
                          "cp: 1")
    if a.dropout > 0 and cfg.parallel.tp > 1:
        # A column-parallel layer's input is replicated over the tensor group: each rank would
        # draw its own mask for the same activations, which one process never does.
        raise ConfigError("adapter.dropout > 0 is not available with tensor parallelism (each rank would draw its "
                          "own dropout mask); set adapter.dropout: 0 or parallel.tp: 1")
    embedding_stage = cfg.train.trainable == "embeddings" or any(p.trainable == "embeddings" for p in cfg.phases)
    if (embedding_stage or cfg.optim.embedding_lr is not None) and "embed_tokens" not in a.modules_to_save:
        raise ConfigError("optim.embedding_lr and trainable: embeddings act on embed_tokens, which an adapter run "
                          "freezes; add embed_tokens to adapter.modules_to_save or drop them")


def _check_fp8(cfg: Config) -> None:
    """precision: fp8 where megacpt builds the linears its own way (the machine is checked by
    megacpt/train/float8.py when the run starts)."""
    if cfg.precision != "fp8":
        return
    par = cfg.parallel
    # Each of these replaces or wraps the block linears (TP's split linears, the pipeline's own
    # stage construction, LoRA factors) or gathers their weights in hooks (ZeRO-3), which
    # torchao's float8 linears were not written for and which no GPU test here has covered.
    for on, what in ((par.tp > 1, "tensor parallelism (parallel.tp > 1)"),
                     (par.pp > 1, "pipeline parallelism (parallel.pp > 1)"),
                     (cfg.adapter is not None, "an adapter (LoRA)"), (par.zero_stage == 3, "ZeRO-3")):
        if on:
            raise ConfigError(f"precision: fp8 is not available with {what}; use precision: bf16, or fp8 with "
                              f"ZeRO 0-2 and tp: 1, pp: 1, no adapter")


SFT_METRICS = ("exact_match", "token_f1", "bleu")
VALID_METRICS = ("loss", "ppl", "ppl_vs_base")
# task: classify logs these per held-out set (gap: its loss minus the training sample's).
CLASSIFY_METRICS = ("loss", "accuracy", "macro_f1", "gap")


def _validate_early_stopping(cfg: Config) -> None:
    es = cfg.train.early_stopping
    if es is None:
        return
    _positive(es.patience, "train.early_stopping.patience")
    _positive(es.min_delta, "train.early_stopping.min_delta", allow_zero=True)
    parts = es.metric.split("/")
    if parts[0] == "task":
        _check_task_metric(cfg, es.metric, parts)
        return
    if len(parts) == 4 and parts[0] == "valid":
        _check_bucket_metric(cfg, es.metric, parts)
        return
    names = [v.name for v in cfg.data.valid]
    kinds = CLASSIFY_METRICS if cfg.task == "classify" else VALID_METRICS + (SFT_METRICS if cfg.task == "sft" else ())
    if len(parts) != 3 or parts[0] != "valid" or parts[1] not in names or parts[2] not in kinds:
        example = f"valid/{names[0]}/loss" if names else "valid/NAME/loss with a data.valid entry NAME"
        raise ConfigError(f"train.early_stopping.metric {es.metric!r} is not a validation metric of this run; "
                          f"use valid/<data.valid name>/<{'|'.join(kinds)}>, e.g. {example}")
    if parts[2] == "ppl_vs_base" and not cfg.train.eval_at_start:
        raise ConfigError(f"train.early_stopping.metric {es.metric!r} is relative to the step-0 evaluation, which "
                          f"train.eval_at_start: false turns off; enable it or use valid/{parts[1]}/loss")
    if parts[2] == "bleu" and not cfg.sft.bleu:
        raise ConfigError("train.early_stopping.metric is BLEU but sft.bleu is false; enable it or pick another metric")
    if parts[2] in SFT_METRICS and cfg.sft.eval_examples == 0:
        raise ConfigError(f"train.early_stopping.metric {es.metric!r} needs generations: set sft.eval_examples > 0")


def _check_bucket_metric(cfg: Config, metric: str, parts: list[str]) -> None:
    """valid/NAME/pos_START_END/<loss|ppl>: a bucket of a by-position set (whether it holds tokens,
    i.e. whether documents reach it, the trainer checks once it has read them)."""
    v = next((v for v in cfg.data.valid if v.name == parts[1] and v.by_position), None)
    seq_len = (v.seq_len or cfg.data.seq_len) if v else 0
    names = [bucket_name(*s) for s in spans(seq_len, v.by_position)] if v else []
    if v is None or parts[2] not in names or parts[3] not in BUCKET_METRICS:
        example = (f"valid/{v.name}/{names[-1]}/loss (buckets of {v.by_position} positions up to {seq_len})" if v
                   else "valid/NAME/pos_0_1024/loss with a data.valid entry NAME that sets by_position: 1024")
        raise ConfigError(f"train.early_stopping.metric {metric!r} is not a by-position metric of this run; use "
                          f"valid/<name>/pos_START_END/<{'|'.join(BUCKET_METRICS)}>, e.g. {example}")


def _check_task_metric(cfg: Config, metric: str, parts: list[str]) -> None:
    names = cfg.eval.tasks.names if cfg.eval.tasks else []
    if len(parts) < 3 or parts[1] not in names or not parts[2]:
        example = f"task/{names[0]}/acc" if names else "task/NAME/acc with NAME in eval.tasks.names"
        raise ConfigError(f"train.early_stopping.metric {metric!r} is not a task metric of this run; use "
                          f"task/<eval.tasks name>/<lm-eval metric>[_vs_base], e.g. {example}")
    if metric.endswith("_vs_base") and not cfg.train.eval_at_start:
        raise ConfigError(f"train.early_stopping.metric {metric!r} is relative to the step-0 evaluation, which "
                          f"train.eval_at_start: false turns off; enable it or drop the _vs_base suffix")


# lm-eval's task metrics where lower is better (its own higher_is_better says so too).
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "loss")


def early_stopping_mode(es: EarlyStoppingConfig) -> str:
    if es.mode is not None:
        return es.mode
    last = es.metric.rsplit("/", 1)[-1]
    if es.metric.startswith("task/"):
        return "min" if any(w in last for w in LOWER_IS_BETTER) else "max"
    return "max" if last in SFT_METRICS + ("accuracy", "macro_f1") else "min"


@dataclass(frozen=True)
class Derived:
    """Values that follow from the config and the launch (never written back into Config)."""

    world_size: int = _field(help="ranks in the launch")
    dp_size: int = _field(help="data-parallel ranks (reading different samples): world_size / (parallel.tp × "
                               "parallel.pp × parallel.cp)")
    grad_accum: int = _field(help="micro-batches each rank accumulates per optimizer step")


def derive(cfg: Config, world_size: int) -> Derived:
    tp, pp, cp = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp
    if world_size % (tp * pp * cp):
        names = "parallel.tp × parallel.pp" + (" × parallel.cp" if cp > 1 else "")
        raise ConfigError(f"world size {world_size} is not divisible by {names} = {tp * pp * cp}")
    dp = world_size // (tp * pp * cp)
    for i, b in enumerate(batch_shapes(cfg)):
        mb, gb = b.micro_batch_size, b.global_batch_size
        if gb % (mb * dp):
            ok = [mb * dp * k for k in range(1, 5)]
            where = "train.global_batch_size" if i == 0 else f"phases.{i - 1} ({b.phase}): global_batch_size"
            raise ConfigError(
                f"{where} ({gb}) is not a multiple of micro_batch_size × data-parallel size "
                f"({mb} × {dp} = {mb * dp}); try one of {ok}"
            )
    mb, gb = cfg.train.micro_batch_size, cfg.train.global_batch_size
    return Derived(world_size=world_size, dp_size=dp, grad_accum=gb // (mb * dp))


# Keys whose change does not change what a resumed run computes.
RESUME_SAFE_KEYS = (
    "run_dir",
    "model.init_from",
    "train.stop_after",
    "train.log_interval",
    "train.eval_interval",
    "train.eval_at_start",
    "train.nonfinite",
    "train.max_rollbacks",
    "train.spike_factor",
    "train.collective_timeout_s",
    "train.cpu_allocator",
    "data.valid",
    "data.valid_tokens",
    "checkpoint.",
    "tensorboard",
    # Where metrics are mirrored to: trackers can be added to (or dropped from) a running job.
    "logging.",
    "phases",
    "sft.eval_examples",
    "sft.max_new_tokens",
    "sft.eval_batch_size",
    "sft.bleu",
    # Task metrics are measured, not trained on: they can be added to (or dropped from) a running job.
    "eval.",
    # The layout does not change what is computed: a resume in another one re-slices the state.
    "parallel.tp",
    "parallel.pp",
    "parallel.pp_balance",
    # Context-parallel ranks are data-parallel ranks to ZeRO: at the same world size (and tp, pp)
    # its partitions and files are the same for every cp; a world size change reshards as usual.
    "parallel.cp",
)


def flatten(tree, prefix="") -> dict:
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = tree
    return out


def diff_configs(old: dict, new: dict) -> list[str]:
    """Dotted keys that differ between two config dicts (as from Config.to_dict())."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


def run_changing_diff(old: dict, new: dict) -> list[str]:
    def safe(k):
        return any(k == s or k.startswith(s if s.endswith(".") else s + ".") for s in RESUME_SAFE_KEYS)

    return [k for k in diff_configs(old, new) if not safe(k)]


# ---------------------------------------------------------------------------------------------
# Documentation


def describe_config() -> str:
    """Every config key, one per line: dotted path (`data.train[].weight` for the items of a list),
    type, default and description, grouped by top-level section (`megacpt train --help-config`)."""
    lines = ["Config keys (YAML; `--set KEY=VALUE` overrides one, list items by index: --set data.train.0.weight=0.9).",
             "Each line: KEY: TYPE = DEFAULT  # DESCRIPTION. A mapping's keys follow it; [] stands for each list item."]
    hints = typing.get_type_hints(Config)
    top = [f for f in dataclasses.fields(Config) if _nested(hints[f.name]) is None]
    lines += ["", "top level"] + [_describe_line(f, hints[f.name], f.name) for f in top]
    for f in dataclasses.fields(Config):
        inner = _nested(hints[f.name])
        if inner is not None:
            lines += ["", f.name, _describe_line(f, hints[f.name], f.name)]
            lines += _describe_fields(inner[0], f.name + inner[1])
    return "\n".join(lines) + "\n"


def _nested(tp):
    """(dataclass, "" or "[]") when a field of type `tp` holds a mapping or a list of mappings, else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if dataclasses.is_dataclass(tp):
        return tp, ""
    if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        return typing.get_args(tp)[0], "[]"
    return None


def _describe_fields(cls, prefix: str) -> list[str]:
    """Lines for the fields of `cls` under `prefix`, each nested field's keys right after it."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{_key(f)}"
        out.append(_describe_line(f, hints[f.name], path))
        inner = _nested(hints[f.name])
        if inner is not None:
            out += _describe_fields(inner[0], path + inner[1])
    return out


def _describe_line(f: dataclasses.Field, tp, path: str) -> str:
    return f"  {path}: {_type_doc(tp)} = {_default_doc(f)}  # {f.metadata['help']}"


def _type_doc(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_doc(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return "list"
    if tp is dict or dataclasses.is_dataclass(tp):
        return "mapping"
    return tp.__name__


def _default_doc(f: dataclasses.Field) -> str:
    if f.default is not MISSING:
        return json.dumps(f.default)
    if f.default_factory is MISSING:
        return "required"
    value = f.default_factory()
    # A section's default is the mapping of its own defaults, which `{}` asks for.
    return "{}" if dataclasses.is_dataclass(value) else json.dumps(value)

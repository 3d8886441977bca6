"""Typed run configuration: YAML in (safe_load), `--set a.b=c` overrides, unknown keys rejected.

The dataclasses below are the schema and the documentation of every key. Values are checked
against the field types when loaded (YAML 1.1 reads `1e-4` as a string: numbers written that
way are accepted for float fields). A loaded Config is never mutated; derived values (world
size, accumulation steps) live in `Derived`, computed separately.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from megacpt.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    init_from: Optional[str] = None  # HF dir or megacpt checkpoint dir: weights only
    max_seq_len: Optional[int] = None  # long-context overrides, written into exported configs
    rope_theta: Optional[float] = None
    rope_scaling: Optional[dict] = None
    activation_checkpointing: bool = False
    # torch.compile each decoder block (after TP and activation checkpointing, before the engine);
    # under ZeRO-3 only the blocks' pointwise code (RMSNorm, RoPE, SwiGLU), plus on CPU megacpt's
    # attention backward and the loss head's compiled softmax pass, see compile_pointwise.
    compile: bool = False


@dataclass(frozen=True)
class TrainSource:
    name: str
    path: str
    weight: float = 1.0


@dataclass(frozen=True)
class ValidSource:
    name: str
    path: str


@dataclass(frozen=True)
class DataConfig:
    seq_len: int = 512
    train: list[TrainSource] = field(default_factory=list)
    valid: list[ValidSource] = field(default_factory=list)
    valid_tokens: int = 8192
    document_mask: bool = False  # attention and positions restart at each document
    mask_eos_loss: bool = False  # do not train on predicting the token after an EOS


@dataclass(frozen=True)
class ScheduleConfig:
    kind: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    warmup_steps: int = 10
    decay_fraction: float = 0.1  # wsd: share of steps spent decaying
    decay_shape: Literal["linear", "1-sqrt"] = "1-sqrt"


@dataclass(frozen=True)
class PhaseData:
    train: list[TrainSource] = field(default_factory=list)


@dataclass(frozen=True)
class PhaseConfig:
    name: str
    steps: int
    data: Optional[PhaseData] = None  # None: the previous phase's mixture
    schedule: Optional[ScheduleConfig] = None  # None: the top-level schedule
    lr: Optional[float] = None  # None: the top-level optim.lr
    min_lr: Optional[float] = None
    trainable: Optional[Literal["all", "embeddings"]] = None  # None: train.trainable


@dataclass(frozen=True)
class EarlyStoppingConfig:
    metric: str  # a validation metric, e.g. valid/new/loss or valid/sft/exact_match
    patience: int = 3  # evaluations in a row without improvement before stopping
    min_delta: float = 0.0  # an improvement must beat the best value by more than this
    mode: Optional[Literal["min", "max"]] = None  # None: max for exact_match/token_f1/bleu, else min


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 1
    global_batch_size: int = 8
    eval_interval: int = 20
    log_interval: int = 1
    stop_after: Optional[int] = None
    eval_at_start: bool = True  # measure the base model before the first step
    nonfinite: Literal["rollback", "stop"] = "rollback"  # on a NaN/inf loss or gradient norm
    max_rollbacks: int = 3  # rollbacks (each skipping the offending batch) before giving up
    spike_factor: float = 3.0  # log a loss_spike event when loss > factor × median of the last 50; 0: off
    collective_timeout_s: float = 1800.0  # a rank that stops participating fails the others after this
    # embeddings: only embed_tokens (and an untied lm_head) learn in the main phase; the rest
    # keeps its weights bit for bit (e.g. right after extend-vocab). Phases may override it.
    trainable: Literal["all", "embeddings"] = "all"
    early_stopping: Optional[EarlyStoppingConfig] = None
    # CPU ranks only. caching: glibc malloc keeps freed blocks for reuse instead of returning
    # them to the kernel after every step (megacpt/train/cpu_alloc.py; faster, but the resident
    # set stays at its peak); system: malloc's defaults.
    cpu_allocator: Literal["caching", "system"] = "caching"


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1.0e-4
    min_lr: float = 1.0e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    # Peak LR of embed_tokens and an untied lm_head; they follow the same schedule scaled by
    # embedding_lr / lr (phases with their own lr too). None: the same LR as everything else.
    embedding_lr: Optional[float] = None


@dataclass(frozen=True)
class ParallelConfig:
    zero_stage: int = 3
    tp: int = 1
    pp: int = 1
    # How pipeline stages are balanced: "parameters" (embedding and head counted) or "layers".
    pp_balance: str = "parameters"
    # Megatron sequence parallelism inside the tensor group (norms/residuals on seq_len/tp positions).
    sequence_parallel: bool = False


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = 50
    keep: int = 2
    # Save when the last step is done. Benchmarks turn it off: a 1B model's final ZeRO
    # checkpoint is ~17 GB of disk and tens of seconds that are not training.
    final: bool = True


@dataclass(frozen=True)
class SFTConfig:
    tokenizer: Optional[str] = None  # tokenizer dir (and chat template); None: the model's HF dir
    eval_examples: int = 32  # held-out examples generated per set for exact_match/token_f1/bleu; 0: loss only
    max_new_tokens: int = 64  # greedy generation length limit
    eval_batch_size: int = 8  # prompts generated together per rank
    bleu: bool = True  # sacrebleu corpus BLEU of the generations (generation tasks)


@dataclass(frozen=True)
class Config:
    run_dir: str = "runs/demo"
    seed: int = 1234
    task: Literal["cpt", "sft"] = "cpt"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    phases: list[PhaseConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)  # task: sft only
    tensorboard: bool = True
    deepspeed: dict = field(default_factory=dict)  # merged last into the generated DeepSpeed config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(e)
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
    fields = {f.name: f for f in dataclasses.fields(cls)}
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
            kwargs[name] = _coerce(data[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required key missing")
    return cls(**kwargs)


def _closest(word: str, options: list[str]) -> Optional[str]:
    import difflib

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
    import copy

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
    """Checks that need no files and no world size."""
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
    if cfg.parallel.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {cfg.parallel.zero_stage}")
    if cfg.parallel.pp > 1:
        # The pipeline stages are built by megacpt/parallel/pp.py, outside the code paths of these.
        for on, what in ((cfg.model.compile, "model.compile"), (cfg.task == "sft", "task: sft"),
                         (cfg.optim.embedding_lr is not None, "optim.embedding_lr"),
                         (cfg.train.trainable != "all" or any(p.trainable not in (None, "all") for p in cfg.phases),
                          "trainable: embeddings")):
            if on:
                raise ConfigError(f"{what} is not available with pipeline parallelism (parallel.pp > 1) yet; "
                                  f"use pp: 1 (tensor parallelism and ZeRO work) or drop {what}")
    if cfg.parallel.sequence_parallel:
        if cfg.parallel.tp < 2:
            raise ConfigError("parallel.sequence_parallel splits positions over the tensor-parallel group: "
                              "set parallel.tp ≥ 2, or turn sequence_parallel off")
        if cfg.parallel.pp > 1:
            raise ConfigError("parallel.sequence_parallel is not available with pipeline parallelism (pp > 1) yet; "
                              "use pp: 1 or turn sequence_parallel off")
        if d.seq_len % cfg.parallel.tp:
            raise ConfigError(f"parallel.sequence_parallel needs data.seq_len ({d.seq_len}) divisible by "
                              f"parallel.tp ({cfg.parallel.tp})")
    if cfg.parallel.sequence_parallel and cfg.task == "sft" and cfg.sft.eval_examples > 0:
        # Greedy generation runs forwards of every length; sequence parallelism needs lengths
        # divisible by tp.
        raise ConfigError("task: sft generations (sft.eval_examples > 0) do not run with parallel.sequence_parallel; "
                          "set sft.eval_examples: 0 or turn sequence_parallel off")
    if cfg.parallel.pp_balance not in ("parameters", "layers"):
        raise ConfigError(f"parallel.pp_balance must be parameters or layers, got {cfg.parallel.pp_balance!r}")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) is not a multiple of train.micro_batch_size "
            f"({t.micro_batch_size})"
        )
    if not 0 < cfg.schedule.decay_fraction <= 1:
        raise ConfigError(f"schedule.decay_fraction must be in (0, 1], got {cfg.schedule.decay_fraction}")
    for i, src in enumerate(d.train):
        if not src.weight > 0:
            raise ConfigError(f"data.train.{i} ({src.name}): weight must be > 0, got {src.weight}")
    for group, items in (("data.train", d.train), ("data.valid", d.valid)):
        names = [s.name for s in items]
        if len(set(names)) != len(names):
            raise ConfigError(f"{group}: source names must be unique, got {names}")
    _validate_early_stopping(cfg)
    if cfg.task == "sft" and cfg.sft.max_new_tokens >= d.seq_len:
        raise ConfigError(f"sft.max_new_tokens ({cfg.sft.max_new_tokens}) must be below data.seq_len ({d.seq_len}): "
                          f"prompt and generation share the sequence")
    names = [p.name for p in cfg.phases]
    if len(set(names)) != len(names):
        raise ConfigError(f"phases: names must be unique, got {names}")
    for i, p in enumerate(cfg.phases):
        _positive(p.steps, f"phases.{i}.steps")
        for j, src in enumerate((p.data.train if p.data else [])):
            if not src.weight > 0:
                raise ConfigError(f"phases.{i}.data.train.{j} ({src.name}): weight must be > 0, got {src.weight}")


SFT_METRICS = ("exact_match", "token_f1", "bleu")
VALID_METRICS = ("loss", "ppl", "ppl_vs_base")


def _validate_early_stopping(cfg: Config) -> None:
    es = cfg.train.early_stopping
    if es is None:
        return
    _positive(es.patience, "train.early_stopping.patience")
    _positive(es.min_delta, "train.early_stopping.min_delta", allow_zero=True)
    parts = es.metric.split("/")
    names = [v.name for v in cfg.data.valid]
    kinds = VALID_METRICS + (SFT_METRICS if cfg.task == "sft" else ())
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


def early_stopping_mode(es: EarlyStoppingConfig) -> str:
    if es.mode is not None:
        return es.mode
    return "max" if es.metric.rsplit("/", 1)[-1] in SFT_METRICS else "min"


@dataclass(frozen=True)
class Derived:
    """Values that follow from the config and the launch (never written back into Config)."""

    world_size: int
    dp_size: int
    grad_accum: int


def derive(cfg: Config, world_size: int) -> Derived:
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp × parallel.pp = {tp * pp}"
        )
    dp = world_size // (tp * pp)
    mb, gb = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if gb % (mb * dp):
        ok = [mb * dp * k for k in range(1, 5)]
        raise ConfigError(
            f"train.global_batch_size ({gb}) is not a multiple of micro_batch_size × data-parallel size "
            f"({mb} × {dp} = {mb * dp}); try one of {ok}"
        )
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
    "phases",
    "sft.eval_examples",
    "sft.max_new_tokens",
    "sft.eval_batch_size",
    "sft.bleu",
    # The layout does not change what is computed: a resume in another one re-slices the state.
    "parallel.tp",
    "parallel.pp",
    "parallel.pp_balance",
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

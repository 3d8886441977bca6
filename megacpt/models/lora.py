"""LoRA (PEFT's): a frozen linear plus a trained low-rank update, y = W x + B(A(dropout(x))) · alpha/r.

The factors hang on the linear they update, under PEFT's names without the adapter name:
`layers.3.self_attn.q_proj.lora_A.weight` (r × in_features) and `....lora_B.weight`
(out_features × r), so the base weights keep their own names (loading, tensor-parallel slices,
checkpoints and consolidation see them unchanged) and export only prefixes the names. A forward
hook on the linear adds the update to its output, whatever the linear is (nn.Linear or a
tensor-parallel one). Tensor parallelism sets the hook's communication attributes (all None here):

  module.lora_input  applied to x first (a linear that enters the tensor-parallel region itself)
  module.lora_mid    applied to A's output (row-parallel: the sum of the ranks' partial products)
  factor.wrap        applied to a factor's weight in forward (identity forward; the backward
                     all-reduce that sums a replicated factor's partial gradients)

Init as PEFT: A kaiming-uniform (a = √5, so U(±1/√in_features)), B zeros: the update starts at 0.
Each A is drawn whole from a generator seeded by the run's seed and its name, so any layout gets
the same values. Module names are megacpt's: HF's without the `model.` prefix.

This module never imports train or parallel: parallelize.py applies the adapter (step 4b).
"""

from __future__ import annotations

import fnmatch
import math
import zlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megacpt.errors import ConfigError, UserError
from megacpt.models.hf import FUSED_ARCHITECTURES, WeightSource
from megacpt.models.llama import ModelArgs

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FACTORS = ("lora_A.weight", "lora_B.weight")
# modules_to_save and the parameter each one trains (embed_tokens and a tied lm_head are one).
SAVED_PARAMS = {"embed_tokens": "embed_tokens.weight", "lm_head": "lm_head.weight", "score": "score.weight"}


@dataclass(frozen=True)
class LoRASpec:
    """An adapter resolved against a model: the matched module names, in model order."""
    r: int
    alpha: float
    dropout: float
    targets: tuple
    modules_to_save: tuple = ()
    seed: int = 0  # of the factors' init

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return asdict(self)


def projection_names(args: ModelArgs) -> list[str]:
    """Every linear an adapter may target, in model order."""
    return [f"layers.{i}.{p}" for i in range(args.num_layers) for p in PROJECTIONS]


def projection_shape(args: ModelArgs, name: str) -> tuple[int, int]:
    """(out_features, in_features) of a projection (full, before any tensor-parallel split)."""
    h, i, d = args.hidden_size, args.intermediate_size, args.head_dim
    q, kv = args.num_heads * d, args.num_kv_heads * d
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    return shapes[name.rsplit(".", 1)[-1]]


def matches(pattern: str, name: str) -> bool:
    """fnmatch on the whole name or on its tail after a dot (so `q_proj` is every layer's)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def resolve(adapter, args: ModelArgs, hf_cfg: dict, seed: int = 0) -> LoRASpec:
    """The adapter config (megacpt.config.AdapterConfig) against the model: a ConfigError naming
    a pattern that matches no projection (with some names that exist), or a fused family."""
    arch = (hf_cfg.get("architectures") or [None])[0]
    if arch in FUSED_ARCHITECTURES:
        raise ConfigError(f"adapter: {arch} stores q/k/v and gate/up fused (qkv_proj, gate_up_proj), which a PEFT "
                          f"adapter of megacpt's split projections cannot target exactly; fine-tune it fully "
                          f"(drop adapter)")
    names = projection_names(args)
    for pattern in adapter.targets:
        if not any(matches(pattern, n) for n in names):
            some = ", ".join(names[:len(PROJECTIONS)])
            raise ConfigError(f"adapter.targets: {pattern!r} matches no projection; names look like {some}, ... "
                              f"(or their last part: q_proj, down_proj)")
    targets = tuple(n for n in names if any(matches(p, n) for p in adapter.targets))
    return LoRASpec(r=adapter.r, alpha=float(adapter.alpha), dropout=float(adapter.dropout), targets=targets,
                    modules_to_save=tuple(adapter.modules_to_save), seed=seed)


def factor_shapes(args: ModelArgs, spec: LoRASpec) -> dict[str, tuple]:
    """Full shape of every factor, by parameter name, in model order."""
    out = {}
    for name in spec.targets:
        rows, cols = projection_shape(args, name)
        out[f"{name}.lora_A.weight"] = (spec.r, cols)
        out[f"{name}.lora_B.weight"] = (rows, spec.r)
    return out


def init_factors(name: str, shape_a: tuple, shape_b: tuple, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's init of one module's (A, B), full size, in fp32: A kaiming-uniform(a=√5), B zeros."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(f"{name}.lora_A".encode())) % 2**63)
    a = torch.empty(shape_a)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
    return a, torch.zeros(shape_b)


class LoRAFactor(nn.Module):
    """A bias-free linear, one factor of an update; its own module so that ZeRO-3 gathers its
    weight when it is called."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.wrap = None  # tensor parallelism: see the module docstring

    def forward(self, x):
        w = self.weight if self.wrap is None else self.wrap(self.weight)
        return F.linear(x, w)


def lora_forward(module: nn.Module, args, out):
    """Forward hook of an adapted linear: its output plus the scaled update (PEFT's order)."""
    x = args[0] if module.lora_input is None else module.lora_input(args[0])
    h = module.lora_A(module.lora_dropout(x))
    if module.lora_mid is not None:
        h = module.lora_mid(h)
    return out + module.lora_B(h) * module.lora_scaling


def attach(module: nn.Module, a: torch.Tensor, b: torch.Tensor, spec: LoRASpec) -> None:
    """Give `module` the factors `a` (r × in, or this rank's slice) and `b` and the update hook."""
    module.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
    module.lora_A = LoRAFactor(a)
    module.lora_B = LoRAFactor(b)
    module.lora_scaling = spec.scaling
    module.lora_input = module.lora_mid = None
    module.register_forward_hook(lora_forward)


def freeze_base(model: nn.Module, modules_to_save=()) -> None:
    """Every parameter stops learning except those of modules_to_save (a tied head is the embedding)."""
    keep = {id(getattr(model, m).weight) for m in modules_to_save if getattr(model, m, None) is not None}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def is_factor(name: str) -> bool:
    return name.endswith((".lora_A.weight", ".lora_B.weight"))


class MergedLoRAWeights(WeightSource):
    """A plain model's weights from an adapter run's: each adapted weight is W + B·A·alpha/r
    (computed in fp32, cast back), the factors are hidden. Reads one tensor at a time."""

    def __init__(self, raw: WeightSource, scaling: float):
        self.raw, self.scaling = raw, scaling
        self._adapted = {n[: -len(".lora_A.weight")] for n in raw.keys() if n.endswith(".lora_A.weight")}

    def keys(self):
        return [n for n in self.raw.keys() if not is_factor(n)]

    def __contains__(self, name):
        return not is_factor(name) and name in self.raw

    def shape(self, name) -> tuple:
        return self.raw.shape(name)

    def get(self, name, rows=None) -> torch.Tensor:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module not in self._adapted:
            return self.raw.get(name, rows)
        w = self.raw.get(name)
        a, b = self.raw.get(f"{module}.lora_A.weight"), self.raw.get(f"{module}.lora_B.weight")
        merged = (w.float() + (b.float() @ a.float()) * self.scaling).to(w.dtype)
        return merged if rows is None else merged[rows]


def check_factor_shapes(weights: WeightSource, args: ModelArgs, spec: LoRASpec, where) -> None:
    """The factors a checkpoint holds have the shapes the adapter config implies."""
    for name, shape in factor_shapes(args, spec).items():
        if name not in weights:
            raise UserError(f"{where}: adapter factor {name} missing; was the run trained with this adapter?")
        if tuple(weights.shape(name)) != shape:
            raise UserError(f"{where}: {name} has shape {tuple(weights.shape(name))}, adapter.r implies {shape}")

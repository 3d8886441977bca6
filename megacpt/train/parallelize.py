"""THE construction of a model for one rank: the only place that applies parallelism and compile.

Training, `megacpt eval`, `bench train` and `bench memory` build through `build_model`, the
pipeline path through `build_pipeline`; `initialize` hands the result to DeepSpeed. The order,
and why it is this one:

1. Build on the meta device: nothing is allocated, so no rank ever holds the whole model when
   ZeRO-3 or tensor parallelism says it need not. (ZeRO-3 without tensor parallelism builds
   inside `deepspeed.zero.Init` instead, which partitions each parameter the moment it exists:
   steps 1 and 3 in one.)
2. Tensor (and sequence) parallelism: `apply_tp` swaps in column/row-parallel linears and the
   vocab-parallel embedding/head, still on meta, so each parameter already has its slice's shape.
3. Pipeline cut (parallel.pp > 1): the TP-split model is cut into items for DeepSpeed's pipeline
   engine and only this rank's stage is materialised (build_pipeline).
4. Load: each rank reads only its tensor-parallel slice of the weights (or draws the
   layout-independent init when a checkpoint is loaded over it later); under ZeRO-3 without TP
   only its flat partition of each parameter.
   4b. Adapter (`adapter:` in the config, megacpt/models/lora.py): every base parameter stops
   learning (modules_to_save aside), and each targeted linear gets its LoRA factors, split like
   the linear under TP (parallel/lora.py). After the load, so the base is loaded by its own names
   and the factors come from the run's seed (or from the weights when they hold factors); before
   ZeRO-3 partitioning, which then cuts the factors like any parameter (ZeRO-3 without TP: a
   second `zero.Init(module=...)` partitions just the new factors, the rest already is).
   Frozen parameters get no gradient and no optimizer state; ZeRO-3 still partitions them.
5. ZeRO-3 partitioning of a TP-split model: `zero.Init(module=...)` cuts each rank's slice over
   the data-parallel group.
   5b. Float8 (`precision: fp8`, train/float8.py): torchao's float8 linears replace the selected
   block linears, keeping their parameters (and names); the LM head and the rest stay bf16. After
   the load, so weights and checkpoints are bf16 tensors as ever; before compile, so the compiled
   blocks contain the casts. Only where no step above reshaped the linears (config.py refuses fp8
   with tp, pp, adapters and ZeRO-3).
6. Activation checkpointing: a flag the blocks read, so it wraps whatever the blocks became.
7. Compile: after TP and activation checkpointing, so it traces the final modules; per block
   (one graph reused by every block), or under ZeRO-3, whose gather hooks on each linear would
   break a compiled block, only the pointwise code between the linears.
8. `deepspeed.initialize` with the generated config and the optimizer's parameter groups.

Context parallelism (parallel.cp) changes no module: `context_parallel` makes the object the
training forward takes (parallel/cp.py), and ZeRO treats the cp ranks as data-parallel ones
(the topology's grad group, dp × cp, given to zero.Init and to DeepSpeed through the mpu).
"""

from __future__ import annotations

from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from megacpt.errors import ConfigError, UserError
from megacpt.models import lora
from megacpt.models.hf import WeightSource, as_weights, check_weights, load_full_state
from megacpt.models.llama import ModelArgs, Transformer, compile_pointwise
from megacpt.parallel import DeepSpeedMPU, UlyssesAttention, apply_tp, init_tp_weights, load_tp_weights
from megacpt.parallel import lora as tp_lora
from megacpt.parallel.layouts import cp_problems
from megacpt.parallel.pp import cut_stages, item_bounds, mark_norm_counting, stage_bounds
from megacpt.train.clip_fold import fold_clipping
from megacpt.train.float8 import convert_float8
from megacpt.train.pipeline import staged_pipeline
from megacpt.train.zero3_masters import share_fp32_masters


@dataclass(frozen=True)
class BuildSpec:
    """What to build for this rank, besides the process groups and the weights."""
    args: ModelArgs
    dtype: torch.dtype = torch.float32
    zero_stage: int = 0
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    compile: bool = False
    pp_balance: str = "parameters"
    seed: int = 0  # the layout-independent random init when no weights are given
    adapter: lora.LoRASpec | None = None  # train a LoRA adapter on the frozen model (step 4b)
    float8: bool = False  # precision: fp8, torchao's float8 linears (step 5b)


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_model(spec: BuildSpec, topology=None, weights=None, ds_config: dict | None = None,
                say=print) -> Transformer:
    """Steps 1, 2 and 4 to 7 for a model that is not cut into pipeline stages. `topology` None
    means one process without process groups (eval); `weights` an HF dir or a WeightSource."""
    device = default_device()
    tp = topology is not None and topology.tp_size > 1
    if spec.zero_stage == 3 and not tp:
        model = _partitioned_while_built(spec.args, ds_config, spec.dtype)  # 1 + 5
        if weights is not None:
            load_partitioned(model, weights)  # 4
        if spec.adapter is not None:  # 4b, then 5 for the factors
            add_adapter(model, spec, weights, tp=False, device=torch.device("cpu"))
            deepspeed.zero.Init(module=model, config_dict_or_path=ds_config, mem_efficient_linear=False)
    else:
        with torch.device("meta"):
            model = Transformer(spec.args)  # 1
        if tp:
            apply_tp(model, topology, sequence_parallel=spec.sequence_parallel)  # 2
            _load_tp(model, weights, spec)  # 4
            if spec.adapter is not None:
                add_adapter(model, spec, weights, tp=True, device=torch.device("cpu"))  # 4b
            if spec.zero_stage == 3:  # 5
                deepspeed.zero.Init(module=model, data_parallel_group=topology.grad_group, mpu=DeepSpeedMPU(topology),
                                    config_dict_or_path=ds_config, mem_efficient_linear=False)
            model = model.to(device)
        else:
            model = _load_whole(model, weights, spec).to(device=device, dtype=spec.dtype)  # 4
            if spec.adapter is not None:
                add_adapter(model, spec, weights, tp=False, device=device)  # 4b
    if spec.float8:
        convert_float8(model, say)  # 5b
    model.activation_checkpointing = spec.activation_checkpointing  # 6
    if spec.compile:
        _compile(model, spec.zero_stage, say)  # 7
    return model


def build_pipeline(spec: BuildSpec, topology, weights=None):
    """Steps 1 to 4 and 6 for pipeline parallelism: the PipelineModule for this rank (only its own
    stage materialised and loaded) and the state its stages share. ZeRO-0/1 only (validated)."""
    if spec.adapter is not None:  # config.py refuses it first; the stages are built elsewhere
        raise UserError("adapter is not available with pipeline parallelism (parallel.pp > 1); use pp: 1")
    if spec.float8:  # likewise
        raise UserError("precision: fp8 is not available with pipeline parallelism (parallel.pp > 1); use pp: 1")
    with torch.device("meta"):
        model = Transformer(spec.args)  # 1
    apply_tp(model, topology)  # 2 (a no-op split at tp 1, which keeps one code path for the stages)
    layer_bounds = stage_bounds(spec.args, topology.pp_size, spec.pp_balance)
    items, state, loss_fn, tied = cut_stages(model, spec.args, topology, layer_bounds, weights=weights,  # 3 + 4
                                             seed=spec.seed, dtype=spec.dtype,
                                             activation_checkpointing=spec.activation_checkpointing)  # 6
    module = staged_pipeline(items, item_bounds(layer_bounds), tied, topology, loss_fn)
    mark_norm_counting(module, topology, tied)
    module.layer_bounds = layer_bounds
    return module, state


def context_parallel(args: ModelArgs, topology) -> UlyssesAttention | None:
    """The context-parallel attention of this rank's cp group, or None without context parallelism."""
    if topology is None or topology.cp_size == 1:
        return None
    problems = cp_problems(args, topology.tp_size, topology.pp_size, topology.cp_size)
    if problems:
        raise ConfigError(f"cannot split sequences over cp={topology.cp_size}: {'; '.join(problems)}")
    return UlyssesAttention(topology.cp_group)


def initialize(model: nn.Module, groups: list[dict], ds_config: dict, topology, say=print):
    """Step 8: the DeepSpeed engine. Pipeline modules carry their own topology; otherwise the
    `mpu` adapter tells ZeRO which group is data-parallel (dp × cp) when tensor parallelism splits
    the model. Without it (tp = 1, pp = 1) that group is the whole world, DeepSpeed's default,
    which is also the group zero.Init partitioned over while building. Under fp32 ZeRO-3 the
    optimizer's redundant fp32 master copy is dropped (train/zero3_masters.py); under ZeRO-1/2
    gradient clipping moves into the fused AdamW step (train/clip_fold.py)."""
    pipelined = topology is not None and topology.pp_size > 1
    mpu = DeepSpeedMPU(topology) if topology is not None and topology.tp_size > 1 and not pipelined else None
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config, mpu=mpu)
    freed = share_fp32_masters(engine)
    fold_clipping(engine)
    if freed and dist.get_rank() == 0:
        say(f"ZeRO-3 fp32: the optimizer's fp32 masters share the parameter partitions (DeepSpeed "
            f"{deepspeed.__version__} kept a copy; {freed / 2**20:.1f} MiB freed on rank 0)")
    return engine


def _partitioned_while_built(args: ModelArgs, ds_config: dict, dtype: torch.dtype) -> Transformer:
    # No dtype= here: DeepSpeed 0.19 parses an explicit dtype as `(dtype or fp16) if fp16 else
    # bf16`, which on CPU turns float32 into bfloat16. The config's bf16 flag says the same thing.
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Transformer(args)
    wrong = {p.ds_tensor.dtype for p in model.parameters()} - {dtype}
    if wrong:
        raise RuntimeError(f"zero.Init created parameters in {wrong}, expected {dtype}")
    return model


def add_adapter(model: Transformer, spec: BuildSpec, weights, tp: bool, device) -> None:
    """Step 4b: freeze the base and give each targeted linear its LoRA factors (this rank's
    slices under TP): from `weights` when they hold factors (an adapter checkpoint read unmerged),
    else PEFT's init from the run's seed, drawn whole so every layout starts from the same values."""
    spec_lora = spec.adapter
    lora.freeze_base(model, spec_lora.modules_to_save)
    shapes = lora.factor_shapes(spec.args, spec_lora)
    source = weights if isinstance(weights, WeightSource) and next(iter(shapes)) in weights else None
    if source is not None:
        lora.check_factor_shapes(source, spec.args, spec_lora, getattr(source, "dir", "checkpoint"))
    for name in spec_lora.targets:
        module = model.get_submodule(name)
        a_name, b_name = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        if source is not None:
            a, b = source.get(a_name), source.get(b_name)
        else:
            a, b = lora.init_factors(name, shapes[a_name], shapes[b_name], spec_lora.seed)
        if tp:
            a, b = tp_lora.split(module, a, b, name)
        lora.attach(module, a.to(device=device, dtype=spec.dtype).contiguous(),
                    b.to(device=device, dtype=spec.dtype).contiguous(), spec_lora)
        if tp:
            tp_lora.wire(module, name, spec.sequence_parallel)


def _load_whole(model: Transformer, weights, spec: BuildSpec) -> Transformer:
    if weights is not None:
        load_full_state(model, weights)
        return model
    model = model.to_empty(device="cpu")
    if spec.args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.init_weights()
    return model


def _load_tp(model: Transformer, weights, spec: BuildSpec) -> None:
    # On CPU first: under ZeRO-3 the slice is partitioned before it moves to the device.
    if weights is not None:
        load_tp_weights(model, weights, device="cpu", dtype=spec.dtype)
    else:  # weights come from a checkpoint after deepspeed.initialize
        init_tp_weights(model, spec.seed, device="cpu", dtype=spec.dtype)


@torch.no_grad()
def load_partitioned(model: nn.Module, source) -> None:
    """ZeRO-3: each rank copies only its own flat partition of every parameter from the files."""
    weights = as_weights(source)
    weights_dir = getattr(weights, "dir", "checkpoint")
    check_weights(weights, model, weights_dir)
    for name, p in model.named_parameters():
        shape = tuple(p.ds_shape)
        if weights.shape(name) != shape:
            raise UserError(f"{weights_dir}: {name} has shape {weights.shape(name)}, config implies {shape}")
        part = p.ds_tensor
        size = part.ds_numel
        start = size * dist.get_rank(group=p.ds_process_group)
        n = max(0, min(size, p.ds_numel - start))
        part.zero_()  # the padding of the last partition
        if n:
            part.narrow(0, 0, n).copy_(weights.get_flat_range(name, start, n))


def _compile(model: Transformer, zero_stage: int, say) -> None:
    if zero_stage == 3:
        # ZeRO-3 gathers each linear's weight in a hook on its module, which would break a
        # compiled block around every linear: compile what lies between the linears instead.
        changed = compile_pointwise(model)
        if changed <= 0:
            raise RuntimeError("model.compile: compile_pointwise found no norm_fn/rope_fn/act_fn to compile")
        say(f"torch.compile: pointwise code (RMSNorm, RoPE, SwiGLU) of {changed} modules in {len(model.layers)} "
            "decoder blocks and the final norm; linears stay eager under ZeRO-3 (compiled at their first call)")
        return
    # Per block, not the whole model: every block has the same graph, so one compilation is
    # reused by all of them, and the fused loss head (our own kernel) stays outside.
    for layer in model.layers:
        layer.compile()
    say(f"torch.compile: {len(model.layers)} decoder blocks (compiled at their first call)")

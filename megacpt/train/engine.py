"""What the DeepSpeed engine is given: the config generated from ours, the precision, and the
optimizer's parameter groups. The engine itself is made in megacpt.train.parallelize."""

from __future__ import annotations

import copy

import torch

from megacpt.config import Config, Derived


def resolve_precision(precision: str) -> torch.dtype:
    """The dtype of parameters and activations. fp8 runs are bf16 runs (train/float8.py swaps the
    block linears' matmuls only), so their DeepSpeed config, masters and checkpoints are bf16's."""
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.bfloat16}[precision]


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def deepspeed_config(cfg: Config, derived: Derived, dtype: torch.dtype) -> dict:
    """DeepSpeed JSON generated from our config; `cfg.deepspeed` is merged last."""
    o = cfg.optim
    zero = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.zero_stage == 3:
        # Gather whole-model state at save time is not needed: we export from the shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    ds = {
        # DeepSpeed counts context-parallel ranks as data-parallel ones (they average gradients
        # like them), so to it a batch holds cp sequence blocks per sequence.
        "train_batch_size": cfg.train.global_batch_size * cfg.parallel.cp,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": derived.grad_accum,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "bf16": bf16_config(dtype),
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # torch's AdamW: no JIT-built extension needed, identical on CPU and GPU.
                "torch_adam": True,
                # Its fused kernel, one pass over each tensor: on an H100 14 ms instead of 39 ms
                # (foreach) per step for 1.2B fp32 masters (bench/profile_gpu.py); on one CPU
                # core 0.08 s instead of 0.48 s (the per-tensor loop DeepSpeed gets on CPU) for
                # a 67M-element ZeRO-3 partition.
                "fused": True,
            },
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return deep_merge(ds, cfg.deepspeed)


def bf16_config(dtype: torch.dtype) -> dict:
    if dtype != torch.bfloat16:
        return {"enabled": False}
    # ZeRO-1/2 would scan every gradient for inf/NaN before the norm (a pass over the gradients,
    # an all-reduce and a host sync per step) and skip a step that has any. The global norm
    # shows the same (DeepSpeed reports an inf/NaN norm as inf or -1), and megacpt checks it after
    # every step (rollback.is_finite): a non-finite step is rolled back to the last checkpoint or
    # stops the run, so the step those optimizers then apply never survives. ZeRO-3 and the
    # ZeRO-0 bf16 optimizer read no such switch (neither scans separately in bf16).
    return {"enabled": True, "check_grad_overflow": False}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on norms and biases (1-D tensors)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitioned params keep their shape here
        (decay if len(shape) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]

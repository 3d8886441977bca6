"""`precision: fp8`: the decoder blocks' linears in float8 through torchao's float8 training.

What changes against a bf16 run: torchao's tensorwise recipe (`convert_to_float8_training` with
dynamic per-tensor scales) swaps the selected `nn.Linear`s for its `Float8Linear`, whose three
matmuls (output, input gradient, weight gradient) run on fp8 tensor cores from bf16 inputs.
Everything else is the bf16 run: bf16 parameters, DeepSpeed's fp32 masters and optimizer, norms,
attention, the embedding, the LM head and its fused loss. Which linears: torchao's own filter
for the recipe (dimensions divisible by 16; small ones, where the casts cost more than fp8
saves, stay bf16), never the LM head or a classifier's `score` head.

Where: one call in megacpt/train/parallelize.py's construction (step 5b), after the weights are
loaded and before compile, so compiled blocks include the casts. The parameter names do not
change, so fp8 and bf16 runs read each other's checkpoints, and export and eval see bf16 weights.

Refused with one line: by config.py where megacpt itself reshapes the linears (tensor
parallelism, pipeline stages, LoRA adapters) or partitions them under hooks (ZeRO-3); here on
machines without fp8 tensor cores (compute capability below 8.9) and without torchao.
"""

from __future__ import annotations

import torch
from torch import nn

from megacpt.errors import ConfigError

# The torchao release this was written against (its float8 API, built for torch ≥ 2.11); the
# `fp8` extra in setup.py pins the same minor.
TORCHAO_VERSION = "0.18.0"
RECIPE = "tensorwise"
# Module names (substrings of the qualified name) that stay bf16 whatever their shape.
BF16_MODULES = ("lm_head", "score")
MIN_CAPABILITY = (8, 9)


def float8_problem(cuda: bool, device: str, capability: tuple[int, int] | None, torchao_error: str | None) -> str | None:
    """Why this machine cannot train in fp8 (one line), or None when it can."""
    if not cuda:
        return ("precision: fp8 needs a CUDA GPU with fp8 tensor cores (compute capability ≥ 8.9, e.g. H100); "
                "this machine has none: use precision: bf16")
    if capability is None or tuple(capability) < MIN_CAPABILITY:
        have = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        return (f"precision: fp8 needs compute capability ≥ 8.9 (H100, H200, L40S, ...); {device} has {have}: "
                f"use precision: bf16")
    if torchao_error is not None:
        return (f"precision: fp8 needs torchao's float8 training, which does not import ({torchao_error}); "
                f"pip install torchao=={TORCHAO_VERSION} (or megacpt[fp8]), or use precision: bf16")
    return None


def _torchao_error() -> str | None:
    try:
        # Optional and heavy (loads its CUDA extensions): only fp8 runs import it.
        import torchao.float8  # noqa: F401
    except Exception as e:  # ImportError, or an extension built for another torch
        first = (str(e).splitlines() or [""])[0]
        return f"{type(e).__name__}: {first}"[:200]
    return None


def check_float8() -> None:
    """ConfigError (one line) unless this machine can train in fp8; before any rank starts."""
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    capability = torch.cuda.get_device_capability() if cuda else None
    error = _torchao_error() if cuda and tuple(capability) >= MIN_CAPABILITY else None
    problem = float8_problem(cuda, device, capability, error)
    if problem:
        raise ConfigError(problem)


def convert_float8(model: nn.Module, say=print) -> list[str]:
    """Swap the selected linears of `model` for torchao's Float8Linear, in place; their names.

    Does not check the machine (check_float8 does, before the run starts): on a CPU the swapped
    linears still run, through torch's reference fp8 matmul, which is what the CPU tests use."""
    # Optional dependency: present only where fp8 was asked for (check_float8 ran first).
    from torchao.float8 import Float8LinearConfig, _auto_filter_for_recipe, convert_to_float8_training

    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    keep = _auto_filter_for_recipe(RECIPE, filter_fqns=list(BF16_MODULES))
    convert_to_float8_training(model, module_filter_fn=keep, config=Float8LinearConfig.from_recipe_name(RECIPE))
    converted = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and type(m) is not nn.Linear]
    if not converted:
        raise ConfigError(f"precision: fp8 found no linear large enough for torchao's {RECIPE} recipe (it leaves "
                          f"linears with ≤ 4096 inputs and ≤ 1024 outputs, or sizes not divisible by 16, in bf16): "
                          f"use precision: bf16")
    say(f"precision fp8: {len(converted)} of {len(linears)} linears in float8 (torchao {RECIPE}); the other "
        f"linears, the LM head, norms, attention and the optimizer as in bf16")
    return converted

"""Named model shapes for benchmarks, as Hugging Face config dicts.

`megacpt bench train --model NAME` accepts an HF directory or one of these names. A name builds a
randomly initialised HF directory once (config.json + safetensors shards, weights drawn tensor by
tensor so an 8B shape never needs the whole model in memory) under the cache directory
($MEGACPT_CACHE, default ~/.cache/megacpt, subfolder shapes/NAME-DTYPE) and reuses it afterwards.
Random weights train at exactly the speed of trained ones: only the shape matters here.

The shapes copy the published configs of the models they are named after (hidden sizes, heads,
vocabularies, tying, RoPE); `tiny` is for smoke tests.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from megacpt.errors import UserError

_LLAMA3_SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict] = {
    # For smoke tests: ~0.2M parameters.
    "tiny": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=1024, hidden_size=64,
                 intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
    # A few million parameters: the default of `megacpt bench memory`.
    "small": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=8192, hidden_size=256,
                  intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                  head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}),
    # HuggingFaceTB/SmolLM2-360M
    "smollm2-360m": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=960,
                         intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}),
    # Qwen/Qwen2.5-0.5B (q/k/v biases are implied by the architecture)
    "qwen2-0.5b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=896,
                       intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       use_sliding_window=False, sliding_window=None,
                       rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}),
    # meta-llama/Llama-3.2-1B
    "llama3-1b": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048,
                      intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=128000, eos_token_id=128001,
                      rope_parameters={"rope_theta": 500000.0, "factor": 32.0, **_LLAMA3_SCALING}),
    # meta-llama/Llama-3.2-3B
    "llama3-3b": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=3072,
                      intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                      head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=128000, eos_token_id=128001,
                      rope_parameters={"rope_theta": 500000.0, "factor": 32.0, **_LLAMA3_SCALING}),
    # meta-llama/Llama-3.1-8B
    "llama3-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=128000, eos_token_id=128001,
                      rope_parameters={"rope_theta": 500000.0, "factor": 8.0, **_LLAMA3_SCALING}),
}

_SHARD_BYTES = 2 * 2**30


def cache_root() -> Path:
    return Path(os.environ.get("MEGACPT_CACHE") or Path.home() / ".cache" / "megacpt")


def hf_config(name: str) -> dict:
    if name not in SHAPES:
        raise UserError(f"unknown shape {name!r}; known: {', '.join(SHAPES)} (or give a Hugging Face model dir)")
    return json.loads(json.dumps(SHAPES[name]))


def resolve_model(model: str, dtype: str = "float32", cache_dir=None) -> tuple[Path, str | None]:
    """(HF dir, shape name or None): an existing HF dir as is, a shape name built (once) in the cache."""
    p = Path(model)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{model} has no config.json; give a Hugging Face model dir or a shape ({', '.join(SHAPES)})")
        return p.resolve(), None
    if model not in SHAPES:
        raise UserError(f"--model {model!r} is neither a directory nor a known shape ({', '.join(SHAPES)})")
    out = Path(cache_dir or cache_root() / "shapes") / f"{model}-{dtype}"
    if not (out / "config.json").is_file():
        build_random_hf_dir(model, out, dtype)
    return out.resolve(), model


def build_random_hf_dir(name: str, out, dtype: str = "float32", seed: int = 0) -> Path:
    """Write a random-init HF dir for shape `name` (normal(0, 0.02) matrices, unit norms, zero biases)."""
    import transformers  # heavy (seconds to import): only building a new shape needs it

    cfg_dict = hf_config(name)
    model_type = cfg_dict.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **cfg_dict)
    config.dtype = dtype
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = [(n, tuple(t.shape)) for n, t in meta.state_dict().items() if not (tied and n == "lm_head.weight")]
    del meta
    tdtype = getattr(torch, dtype)
    out = Path(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict] = [{}]
    size = 0
    for n, shape in tensors:
        if n.endswith("norm.weight"):
            t = torch.ones(shape, dtype=tdtype)
        elif n.endswith(".bias"):
            t = torch.zeros(shape, dtype=tdtype)
        else:
            t = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(tdtype)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][n] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out

"""`megacpt export RUN_OR_CHECKPOINT --output HF_DIR`: a checkpoint of any ZeRO stage → HF dir."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megacpt.errors import UserError
from megacpt.models.hf import args_from_hf_config, as_weights, read_hf_config, save_hf
from megacpt.train import checkpoint as ckpt
from megacpt.train.consolidate import checkpoint_weights


def load_model_source(path):
    """(ModelArgs, base HF config, WeightSource, tokenizer source dir) for an HF dir, run or checkpoint."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path} does not exist; pass an HF model dir, a run dir or a checkpoint dir")
    found = ckpt.resolve_checkpoint(p)
    if found is not None:
        weights = checkpoint_weights(found)  # first: it verifies the manifest before any file is read
        cfg = json.loads((found / ckpt.HF_CONFIG_FILE).read_text())
        source_dir = ckpt.read_state(found).get("source_dir")
        return args_from_hf_config(cfg, str(found)), cfg, weights, source_dir
    if (p / "config.json").is_file():
        cfg = read_hf_config(p)
        return args_from_hf_config(cfg, str(p)), cfg, as_weights(p), p
    raise UserError(f"{path} is neither a Hugging Face model dir (config.json) nor a run/checkpoint dir")


def export(src, output, dtype: str | None = None) -> Path:
    args, cfg, weights, source_dir = load_model_source(src)
    out_dtype = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    names = [n for n in weights.keys() if not (args.tie_word_embeddings and n == "lm_head.weight")]
    tensors = ((n, weights.get(n)) for n in names)  # one tensor at a time
    tokenizer_dir = source_dir if source_dir and Path(source_dir).is_dir() else None
    save_hf(tensors, args, cfg, output, source_dir=tokenizer_dir, dtype=out_dtype)
    return Path(output)


def run(args) -> int:
    """`megacpt export` (parser: megacpt/cli/export.py)."""
    out = export(args.src, args.output, args.dtype)
    print(f"exported {args.src} -> {out}")
    return 0

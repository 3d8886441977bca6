"""`megacpt export RUN_OR_CHECKPOINT --output HF_DIR`: a checkpoint of any ZeRO stage → HF dir."""

from __future__ import annotations

import json
from pathlib import Path

from megacpt.errors import UserError


def load_model_source(path):
    """(ModelArgs, base HF config, WeightSource, tokenizer source dir) for an HF dir, run or checkpoint."""
    from megacpt.models.hf import args_from_hf_config, as_weights, read_hf_config
    from megacpt.train import checkpoint as ckpt

    p = Path(path)
    if not p.exists():
        raise UserError(f"{path} does not exist; pass an HF model dir, a run dir or a checkpoint dir")
    found = ckpt.resolve_checkpoint(p)
    if found is not None:
        from megacpt.train.consolidate import checkpoint_weights

        cfg = json.loads((found / ckpt.HF_CONFIG_FILE).read_text())
        source_dir = ckpt.read_state(found).get("source_dir")
        return args_from_hf_config(cfg, str(found)), cfg, checkpoint_weights(found), source_dir
    if (p / "config.json").is_file():
        cfg = read_hf_config(p)
        return args_from_hf_config(cfg, str(p)), cfg, as_weights(p), p
    raise UserError(f"{path} is neither a Hugging Face model dir (config.json) nor a run/checkpoint dir")


def export(src, output, dtype: str | None = None) -> Path:
    import torch

    from megacpt.models.hf import save_hf

    args, cfg, weights, source_dir = load_model_source(src)
    out_dtype = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    names = [n for n in weights.keys() if not (args.tie_word_embeddings and n == "lm_head.weight")]
    tensors = ((n, weights.get(n)) for n in names)  # one tensor at a time
    tokenizer_dir = source_dir if source_dir and Path(source_dir).is_dir() else None
    save_hf(tensors, args, cfg, output, source_dir=tokenizer_dir, dtype=out_dtype)
    return Path(output)


def _run(args) -> int:
    out = export(args.src, args.output, args.dtype)
    print(f"exported {args.src} -> {out}")
    return 0


def register(sub) -> None:
    from megacpt.cli import add_common

    p = sub.add_parser("export", help="write a run/checkpoint as a Hugging Face model directory",
                       description="Consolidate a checkpoint (any ZeRO stage, any world size) into an HF dir "
                                   "(config.json, safetensors, tokenizer files).")
    p.add_argument("src", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--output", required=True, metavar="HF_DIR")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the written weights (default: as trained, fp32 masters)")
    add_common(p)
    p.set_defaults(func=_run)

"""`megacpt export`: the parser; the work is megacpt.export.run."""

from __future__ import annotations

from megacpt.cli.common import add_common


def add_parsers(sub) -> None:
    p = sub.add_parser("export", help="write a run/checkpoint as a Hugging Face model directory",
                       description="Consolidate a checkpoint (any ZeRO stage, any world size) into an HF dir "
                                   "(config.json, safetensors, tokenizer files); an adapter run's merged, or "
                                   "with --adapter its PEFT LoRA adapter.")
    p.add_argument("src", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--output", required=True, metavar="HF_DIR")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the written weights (default: as trained, fp32 masters)")
    p.add_argument("--adapter", action="store_true",
                   help="adapter runs: write the LoRA adapter as a PEFT adapter dir (adapter_config.json, "
                        "adapter_model.safetensors) instead of the merged model")
    add_common(p)
    p.set_defaults(target="megacpt.export:run")

"""`megacpt export RUN_OR_CHECKPOINT --output HF_DIR`: a checkpoint of any ZeRO stage → HF dir.

An adapter run exports merged (W + B·A·alpha/r, a plain model), or with `--adapter` as a PEFT
LoRA adapter directory: adapter_config.json (peft_type LORA, r, lora_alpha, lora_dropout,
target_modules, modules_to_save, base_model_name_or_path = the run's model.init_from) and
adapter_model.safetensors under PEFT's names (base_model.model.model.layers.0.self_attn.q_proj
.lora_A.weight, ...; modules_to_save whole: base_model.model.model.embed_tokens.weight,
base_model.model.lm_head.weight), which `peft.PeftModel.from_pretrained(base, DIR)` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from megacpt import atomic
from megacpt.errors import UserError
from megacpt.models.hf import args_from_hf_config, as_weights, hf_name, read_hf_config, save_hf
from megacpt.models.lora import SAVED_PARAMS, PROJECTIONS, is_factor, projection_names
from megacpt.train import checkpoint as ckpt
from megacpt.train.consolidate import adapter_of, checkpoint_weights

DTYPES = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEFT_PREFIX = "base_model.model."


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
    out_dtype = DTYPES[dtype]
    names = [n for n in weights.keys() if not (args.tie_word_embeddings and n == "lm_head.weight")]
    tensors = ((n, weights.get(n)) for n in names)  # one tensor at a time
    tokenizer_dir = source_dir if source_dir and Path(source_dir).is_dir() else None
    save_hf(tensors, args, cfg, output, source_dir=tokenizer_dir, dtype=out_dtype)
    return Path(output)


def peft_targets(adapted: list[str], args) -> list[str]:
    """PEFT target_modules for the adapted modules (megacpt names): a projection's short name
    (q_proj) where every layer's is adapted, else each module's full HF name, so PEFT adapts
    exactly these."""
    every = projection_names(args)
    out = []
    for proj in PROJECTIONS:
        leaf = proj.rsplit(".", 1)[-1]
        mine = [n for n in every if n.endswith("." + proj) and n in adapted]
        if len(mine) == args.num_layers:
            out.append(leaf)
        else:
            out += [hf_name(n) for n in mine]
    return out


def adapter_config(adapter: dict, adapted: list[str], saved: list[str], base, args) -> dict:
    """adapter_config.json: PEFT's LoraConfig keys (the others take PEFT's defaults)."""
    task = "SEQ_CLS" if args.num_labels else "CAUSAL_LM"
    return {"peft_type": "LORA", "task_type": task, "r": int(adapter["r"]),
            "lora_alpha": _number(adapter["alpha"]), "lora_dropout": float(adapter["dropout"]),
            "target_modules": peft_targets(adapted, args), "modules_to_save": saved or None,
            "base_model_name_or_path": base, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "inference_mode": True, "rank_pattern": {},
            "alpha_pattern": {}}


def _number(x):
    """An integral float as an int (how PEFT writes lora_alpha), others as they are."""
    return int(x) if float(x).is_integer() else float(x)


def export_adapter(src, output, dtype: str | None = None) -> Path:
    """A run's (or checkpoint's) LoRA adapter as a PEFT adapter directory, written whole or not at all."""
    if not Path(src).exists():
        raise UserError(f"{src} does not exist; pass the run dir or checkpoint dir of an adapter run")
    found = ckpt.resolve_checkpoint(src)
    adapter = adapter_of(found) if found is not None else None
    if adapter is None:
        raise UserError(f"{src} is not an adapter run or checkpoint (no adapter: in its config); export it "
                        f"without --adapter")
    state = ckpt.read_state(found)
    args = args_from_hf_config(json.loads((found / ckpt.HF_CONFIG_FILE).read_text()), str(found))
    weights = checkpoint_weights(found, merge_adapter=False)
    factors = [n for n in weights.keys() if is_factor(n)]
    adapted = sorted({n.rsplit(".", 2)[0] for n in factors}, key=projection_names(args).index)
    saved = list(adapter.get("modules_to_save") or [])
    if saved and args.tie_word_embeddings:
        saved = ["embed_tokens", "lm_head"]  # one matrix: PEFT keeps a trained copy for each of the two modules
    if args.num_labels:
        saved.append("score")  # a classifier's head trains whole beside the adapter
    tensors = {}
    for name in factors + [SAVED_PARAMS[m] for m in saved]:
        stored = "embed_tokens.weight" if args.tie_word_embeddings and name == "lm_head.weight" else name
        t = weights.get(stored).detach()
        tensors[PEFT_PREFIX + hf_name(name)] = t.to("cpu", DTYPES[dtype] or t.dtype).contiguous().clone()
    init_from = state.get("config", {}).get("model", {}).get("init_from")
    base = str(Path(init_from).resolve()) if init_from else None
    config = adapter_config(adapter, adapted, saved, base, args)

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    atomic.write_dir(Path(output), fill)
    if init_from and ckpt.resolve_checkpoint(init_from) is not None:
        print(f"note: the base ({init_from}) is a megacpt checkpoint: export it with `megacpt export` and set "
              f"base_model_name_or_path in {Path(output) / 'adapter_config.json'} to that directory")
    return Path(output)




def run(args) -> int:
    """`megacpt export` (parser: megacpt/cli/export.py)."""
    if getattr(args, "adapter", False):
        out = export_adapter(args.src, args.output, args.dtype)
        print(f"exported the adapter of {args.src} -> {out} (PEFT LoRA)")
        return 0
    out = export(args.src, args.output, args.dtype)
    print(f"exported {args.src} -> {out}")
    return 0

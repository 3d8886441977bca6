"""Full weights out of a megacpt checkpoint of any layout: ZeRO stage, dp size, tp and pp.

- ZeRO-1/2/3 keep the fp32 master weights flattened and partitioned in each rank's optimizer
  file; DeepSpeed's zero_to_fp32 reassembles them (lazily: one tensor at a time). ZeRO-0 holds
  the module state whole in mp_rank_00_model_states.pt.
- Tensor parallel (mp_rank_01… present): the same per tensor-parallel rank (zero_to_fp32 is run
  on a view of the directory holding only that rank's files), then each split tensor is put
  together from its slices; which slice a rank holds is computed from the model's shape
  (megacpt.parallel.shapes), so the checkpoint needs no extra metadata.
- Pipeline parallel (layer_XX[-model_YY]-model_states.pt): each layer file holds that item's
  weights under the plain model's names in the training dtype (fp32 on CPU); tp slices as above.
  (ZeRO-1's fp32 masters for bf16 pipeline runs are not read: exported in the training dtype.)
TP/PP exports hold the full model in memory once.

Adapter runs (`adapter:`): the checkpoint holds the frozen base under its own names and the LoRA
factors (`<module>.lora_A.weight`, `.lora_B.weight`; their TP slices from parallel/shapes.py
factor_shards). `checkpoint_weights` hands out the merged model (W + B·A·alpha/r: what export,
eval and init_from read), `merge_adapter=False` the tensors as stored (export --adapter). ZeRO-1
keeps frozen parameters out of its optimizer files and zero_to_fp32 does not list them (ZeRO-2/3
save them as frozen fragments, which it reads): they come from the module state, saved whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from megacpt.models.hf import StateDictWeights, WeightSource, args_from_hf_config
from megacpt.models.lora import MergedLoRAWeights
from megacpt.parallel.shapes import adapter_shards, tp_shards_for
from megacpt.safe_load import check_torch_file, safe_load
from megacpt.train.checkpoint import HF_CONFIG_FILE, STATE_FILE
from megacpt.train.manifest import require_intact

_LAYER = re.compile(r"^layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
_MP = re.compile(r"mp_rank_(\d+)")


def adapter_of(ckpt_dir) -> dict | None:
    """The `adapter` config of the run that wrote the checkpoint (None: full fine-tuning)."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("config", {}).get("adapter")


def checkpoint_weights(ckpt_dir, merge_adapter: bool = True) -> WeightSource:
    """The model's full tensors by megacpt name; an adapter run's merged unless merge_adapter=False."""
    ckpt_dir = Path(ckpt_dir)
    require_intact(ckpt_dir)  # a damaged or truncated file is named here, not met half-way through a load
    adapter = adapter_of(ckpt_dir)
    raw = StateDictWeights(_stored_state(ckpt_dir, adapter))
    if adapter is not None and merge_adapter:
        return MergedLoRAWeights(raw, float(adapter["alpha"]) / int(adapter["r"]))
    return raw


def _stored_state(ckpt_dir: Path, adapter: dict | None) -> dict:
    files = sorted(ckpt_dir.glob("*.pt"))
    for f in files:
        check_torch_file(f)  # before DeepSpeed unpickles anything with weights_only=False
    layer_files = [f for f in files if _LAYER.match(f.name)]
    if layer_files:
        return _merge_tp(ckpt_dir, _pipeline_states(layer_files))
    mp_ranks = sorted({int(m.group(1)) for f in files if (m := _MP.search(f.name))})
    if len(mp_ranks) > 1:
        return _merge_tp(ckpt_dir, [_tp_rank_state(ckpt_dir, files, t, adapter is not None) for t in mp_ranks])
    if any(f.name.endswith("optim_states.pt") for f in files):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, lazy_mode=True)
        return _with_frozen(state, ckpt_dir / "mp_rank_00_model_states.pt") if adapter is not None else state
    return safe_load(ckpt_dir / "mp_rank_00_model_states.pt")["module"]


def _with_frozen(state, model_states: Path) -> dict:
    """zero_to_fp32's tensors plus the frozen ones it does not list (ZeRO-1), from the module
    state, which ZeRO-1/2 write whole to mp_rank_XX_model_states.pt (ZeRO-3 writes per-rank
    zero_pp_rank_* files, and zero_to_fp32 reads its frozen fragments itself)."""
    out = dict(state)
    if not model_states.is_file():
        return out
    for name, t in safe_load(model_states)["module"].items():
        if name not in out and t.numel() > 0:
            out[name] = t
    return out


def _pipeline_states(layer_files: list[Path]) -> list[dict]:
    """One {name: tensor} per tensor-parallel rank from the per-layer files."""
    by_rank: dict[int, dict] = {}
    for f in layer_files:
        m = _LAYER.match(f.name)
        by_rank.setdefault(int(m.group(2) or 0), {}).update(safe_load(f))
    return [by_rank[t] for t in sorted(by_rank)]


def _tp_rank_state(ckpt_dir: Path, files: list[Path], t: int, adapter: bool = False) -> dict:
    """Tensor-parallel rank t's (sliced) weights, fp32 masters where ZeRO holds them."""
    tag = f"mp_rank_{t:02d}"
    mine = [f for f in files if tag in f.name]
    if not any(f.name.endswith("optim_states.pt") for f in mine):
        return dict(safe_load(ckpt_dir / f"{tag}_model_states.pt")["module"])
    if adapter:
        return _with_frozen(_tp_rank_zero_state(mine, tag), ckpt_dir / f"{tag}_model_states.pt")
    return _tp_rank_zero_state(mine, tag)


def _tp_rank_zero_state(mine: list[Path], tag: str) -> dict:
    # zero_to_fp32 knows one model-parallel rank (mp_rank_00): show it this rank's files as such.
    tmp = Path(tempfile.mkdtemp(prefix="megacpt-tp-"))
    try:
        view = tmp / "view"
        view.mkdir()
        for f in mine:
            os.symlink(f.resolve(), view / f.name.replace(tag, "mp_rank_00"))
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(tmp), tag="view", lazy_mode=True)
        return {n: v.contiguous().clone() for n, v in lazy.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _merge_tp(ckpt_dir: Path, states: list[dict]) -> dict:
    if len(states) == 1:
        return states[0]
    args = args_from_hf_config(json.loads((ckpt_dir / HF_CONFIG_FILE).read_text()), str(ckpt_dir))
    tp = len(states)
    adapter = adapter_of(ckpt_dir)
    layouts = [tp_shards_for(args, tp, t) for t in range(tp)]
    if adapter is not None:
        layouts = [adapter_shards(lay, states[0].keys(), int(adapter["r"])) for lay in layouts]
    full = {}
    for name, first in states[0].items():
        shard = layouts[0].get(name)
        if shard is None:
            full[name] = first
            continue
        out = torch.empty(shard.full_shape, dtype=first.dtype)
        for t in range(tp):
            part = states[t].get(name)
            if part is None and name == "lm_head.weight" and args.tie_word_embeddings:
                part = states[t]["embed_tokens.weight"]  # zero_to_fp32 records the tie on one rank only
            out[layouts[t][name].index()] = part
        full[name] = out
    return full

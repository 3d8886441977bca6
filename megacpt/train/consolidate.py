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

from megacpt.models.hf import StateDictWeights, args_from_hf_config
from megacpt.parallel.shapes import tp_shards_for
from megacpt.safe_load import check_torch_file, safe_load
from megacpt.train.checkpoint import HF_CONFIG_FILE
from megacpt.train.manifest import require_intact

_LAYER = re.compile(r"^layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
_MP = re.compile(r"mp_rank_(\d+)")


def checkpoint_weights(ckpt_dir) -> StateDictWeights:
    ckpt_dir = Path(ckpt_dir)
    require_intact(ckpt_dir)  # a damaged or truncated file is named here, not met half-way through a load
    files = sorted(ckpt_dir.glob("*.pt"))
    for f in files:
        check_torch_file(f)  # before DeepSpeed unpickles anything with weights_only=False
    layer_files = [f for f in files if _LAYER.match(f.name)]
    if layer_files:
        return StateDictWeights(_merge_tp(ckpt_dir, _pipeline_states(layer_files)))
    mp_ranks = sorted({int(m.group(1)) for f in files if (m := _MP.search(f.name))})
    if len(mp_ranks) > 1:
        return StateDictWeights(_merge_tp(ckpt_dir, [_tp_rank_state(ckpt_dir, files, t) for t in mp_ranks]))
    if any(f.name.endswith("optim_states.pt") for f in files):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, lazy_mode=True)
    else:
        state = safe_load(ckpt_dir / "mp_rank_00_model_states.pt")["module"]
    return StateDictWeights(state)


def _pipeline_states(layer_files: list[Path]) -> list[dict]:
    """One {name: tensor} per tensor-parallel rank from the per-layer files."""
    by_rank: dict[int, dict] = {}
    for f in layer_files:
        m = _LAYER.match(f.name)
        by_rank.setdefault(int(m.group(2) or 0), {}).update(safe_load(f))
    return [by_rank[t] for t in sorted(by_rank)]


def _tp_rank_state(ckpt_dir: Path, files: list[Path], t: int) -> dict:
    """Tensor-parallel rank t's (sliced) weights, fp32 masters where ZeRO holds them."""
    tag = f"mp_rank_{t:02d}"
    mine = [f for f in files if tag in f.name]
    if not any(f.name.endswith("optim_states.pt") for f in mine):
        return dict(safe_load(ckpt_dir / f"{tag}_model_states.pt")["module"])

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
    layouts = [tp_shards_for(args, tp, t) for t in range(tp)]
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

"""Full fp32 weights out of a megacpt checkpoint, of any ZeRO stage and world size.

ZeRO-1/2/3 checkpoints keep the fp32 master weights flattened and partitioned in each rank's
optimizer-state file; DeepSpeed's zero_to_fp32 reassembles them. Its lazy mode memory-maps those
files and materialises one tensor at a time, so export streams instead of holding the model
several times over. ZeRO-0 checkpoints hold the module state whole.
"""

from __future__ import annotations

from pathlib import Path

from megacpt.models.hf import StateDictWeights
from megacpt.train.safe_load import check_torch_file, safe_load


def checkpoint_weights(ckpt_dir) -> StateDictWeights:
    ckpt_dir = Path(ckpt_dir)
    files = sorted(ckpt_dir.glob("*.pt"))
    if any("mp_rank_01" in f.name for f in files):
        from megacpt.errors import UserError

        raise UserError(f"{ckpt_dir} is a tensor-parallel checkpoint; consolidating those is not supported yet "
                        f"(resume it in the same layout)")
    for f in files:
        check_torch_file(f)  # before DeepSpeed unpickles anything with weights_only=False
    if any(f.name.endswith("optim_states.pt") for f in files):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, lazy_mode=True)
    else:
        state = safe_load(ckpt_dir / "mp_rank_00_model_states.pt")["module"]
    return StateDictWeights(state)

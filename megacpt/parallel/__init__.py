"""Parallelism applied to the one plain model after construction (see shared DESIGN.md).

- topology: `Topology` (pp × dp × cp × tp ranks and process groups, one explicit object) and
  `DeepSpeedMPU` (the `mpu=` adapter for DeepSpeed);
- cp: `UlyssesAttention`, context parallelism (sequences split over ranks, attention by heads);
- layouts: `validate_layout`, config-time checks that name the layouts that would work;
- tp: `apply_tp`, the column/row/vocab-parallel layers, `load_tp_weights`, `gather_tp_state`.

Importing this package imports neither deepspeed nor the kernels.
"""

from megacpt.parallel.cp import UlyssesAttention
from megacpt.parallel.layouts import valid_layouts, validate_layout
from megacpt.parallel.topology import DeepSpeedMPU, RankLayout, Topology
from megacpt.parallel.tp import (
                                 apply_tp,
                                 gather_tp_state,
                                 init_tp_weights,
                                 iter_tp_state,
                                 load_tp_weights,
                                 tp_grad_norm,
                                 tp_grad_sq,
                                 tp_shards,
)

__all__ = ["Topology", "RankLayout", "DeepSpeedMPU", "UlyssesAttention", "validate_layout", "valid_layouts", "apply_tp",
           "load_tp_weights", "init_tp_weights", "gather_tp_state", "iter_tp_state", "tp_shards", "tp_grad_norm",
           "tp_grad_sq"]

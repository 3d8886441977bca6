"""Process topology for world = dp × tp × pp, as one explicit object (no global state).

Rank order (Megatron's; also DeepSpeed's `PipeModelDataParallelTopology`, axes pipe, data, model):
tensor-parallel rank varies fastest, then data-parallel, then pipeline:

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

so a tensor-parallel group is `tp` consecutive ranks (inside one node when tp ≤ GPUs per node),
a data-parallel group is the ranks with the same (pp_rank, tp_rank), spaced `tp` apart, and a
pipeline group is the ranks with the same (dp_rank, tp_rank), spaced `tp * dp` apart.
Example, world 8, tp 2, pp 2 (so dp 2):

    tp groups  [0,1] [2,3] [4,5] [6,7]
    dp groups  [0,2] [1,3] [4,6] [5,7]
    pp groups  [0,4] [1,5] [2,6] [3,7]

`RankLayout` is the pure arithmetic (testable without processes); `Topology` adds the
torch.distributed groups. `torch.distributed.new_group` is collective over the whole world and
must be called with the same arguments in the same order on every rank, so `Topology` creates
every group of every kind on every rank and keeps the ones this rank belongs to.
`DeepSpeedMPU(topology)` is the `mpu=` object for `deepspeed.initialize` / `zero.Init`, so ZeRO
shards and averages over the data-parallel group only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["RankLayout", "Topology", "DeepSpeedMPU"]


@dataclass(frozen=True)
class RankLayout:
    """Which tp/dp/pp coordinates and groups a rank has; pure arithmetic, no processes."""

    world_size: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        for name in ("world_size", "tp", "pp"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.world_size % (self.tp * self.pp):
            raise ValueError(f"world size {self.world_size} is not divisible by tp × pp = {self.tp}×{self.pp}")

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        pp_rank = rank // (self.tp * self.dp)
        return pp_rank, dp_rank, tp_rank

    # Every group of a kind, in a fixed order (the order groups are created in).
    def tp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def embed_groups(self) -> list[list[int]]:
        """First and last pipeline stage of each (dp_rank, tp_rank): the ranks holding the two
        copies of a tied embedding (empty when pp = 1: nothing to tie across stages)."""
        if self.pp == 1:
            return []
        return [[self.rank_of(0, d, t), self.rank_of(self.pp - 1, d, t)] for d in range(self.dp) for t in range(self.tp)]

    def model_parallel_groups(self) -> list[list[int]]:
        """Ranks holding one replica of the model (same dp_rank): tp × pp ranks."""
        return [sorted(self.rank_of(p, d, t) for p in range(self.pp) for t in range(self.tp)) for d in range(self.dp)]

    def tp_subgroups(self, size: int) -> list[list[int]]:
        """Each tp group cut into consecutive blocks of `size` ranks (e.g. ranks sharing a KV head)."""
        if size < 1 or self.tp % size:
            raise ValueError(f"tp sub-group size {size} does not divide tp = {self.tp}")
        return [g[i:i + size] for g in self.tp_groups() for i in range(0, self.tp, size)]

    @staticmethod
    def group_of(groups: list[list[int]], rank: int) -> list[int]:
        for g in groups:
            if rank in g:
                return g
        raise ValueError(f"rank {rank} in no group")


class Topology:
    """This rank's place in dp × tp × pp and its process groups (see the module docstring).

    Creating it is collective: every rank of the world must construct it with the same tp and pp.
    With world_size 1 (no process group started) all groups are None and all sizes 1.
    """

    def __init__(self, world_size: int, rank: int, tp: int = 1, pp: int = 1):
        self.layout = RankLayout(world_size, tp, pp)
        self.rank = rank
        self.pp_rank, self.dp_rank, self.tp_rank = self.layout.coords(rank)
        self.tp_size, self.pp_size, self.dp_size = tp, pp, self.layout.dp
        self.world_size = world_size
        L = self.layout
        self.tp_ranks = L.group_of(L.tp_groups(), rank)
        self.dp_ranks = L.group_of(L.dp_groups(), rank)
        self.pp_ranks = L.group_of(L.pp_groups(), rank)
        self.mp_ranks = L.group_of(L.model_parallel_groups(), rank)
        self._distributed = world_size > 1 or (dist.is_available() and dist.is_initialized())
        if self._distributed and not dist.is_initialized():
            raise RuntimeError("Topology with world_size > 1 needs torch.distributed initialised first")
        if self._distributed and dist.get_world_size() != world_size:
            raise ValueError(f"world_size {world_size} != torch.distributed world size {dist.get_world_size()}")
        self.tp_group = self._create(L.tp_groups())
        self.dp_group = self._create(L.dp_groups())
        self.pp_group = self._create(L.pp_groups())
        self.mp_group = self._create(L.model_parallel_groups())
        self.embed_group = self._create(L.embed_groups())
        self.embed_ranks = next((g for g in L.embed_groups() if rank in g), None)
        self._sub: dict[int, object] = {}

    @classmethod
    def from_dist(cls, tp: int = 1, pp: int = 1) -> "Topology":
        """From the running torch.distributed world (or a world of one if none is running)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_world_size(), dist.get_rank(), tp, pp)
        return cls(1, 0, tp, pp)

    def _create(self, groups: list[list[int]]):
        """Create every group (collective, same order everywhere); keep the one holding this rank."""
        if not self._distributed:
            return None
        mine = None
        for ranks in groups:
            g = dist.new_group(ranks)
            if self.rank in ranks:
                mine = g
        return mine

    def tp_subgroup(self, size: int):
        """The group of the `size` consecutive tp ranks around this rank (cached).

        Collective on first use for a given size: every rank must call it (apply_tp does, for
        replicated KV heads, before touching any layer)."""
        if size not in self._sub:
            self._sub[size] = self._create(self.layout.tp_subgroups(size))
        return self._sub[size]

    def __repr__(self) -> str:
        return (f"Topology(rank={self.rank}/{self.world_size}, tp={self.tp_rank}/{self.tp_size}, "
                f"dp={self.dp_rank}/{self.dp_size}, pp={self.pp_rank}/{self.pp_size})")


class DeepSpeedMPU:
    """The `mpu` object DeepSpeed (0.19) queries, backed by a Topology.

    "Model parallel" here means tensor parallel (Megatron's convention, which DeepSpeed's
    gradient-norm and ZeRO code follow: the norm of a parameter without `tensor_model_parallel`
    is counted on tensor-parallel rank 0 only, then summed over `get_model_parallel_group()`).
    Data-parallel queries return the dp group, so ZeRO partitions and averages over it only.
    Pipeline runs use DeepSpeed's own grid from a PipelineModule instead (same rank order).
    Deliberately no `initialize_sequence_parallel` / sequence-parallel methods: DeepSpeed reads
    their presence as "Megatron sequence parallel" and then ignores the data-parallel group.
    """

    def __init__(self, topology: Topology):
        self.t = topology

    # tensor (model) parallel
    def get_tensor_model_parallel_rank(self):
        return self.t.tp_rank

    def get_tensor_model_parallel_world_size(self):
        return self.t.tp_size

    def get_tensor_model_parallel_group(self):
        return self.t.tp_group

    def get_tensor_model_parallel_src_rank(self):
        return self.t.tp_ranks[0]

    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group

    # data parallel
    def get_data_parallel_rank(self):
        return self.t.dp_rank

    def get_data_parallel_world_size(self):
        return self.t.dp_size

    def get_data_parallel_group(self):
        return self.t.dp_group

    def get_data_parallel_group_ranks(self):
        return list(self.t.dp_ranks)

    # pipeline parallel
    def get_pipeline_model_parallel_rank(self):
        return self.t.pp_rank

    def get_pipeline_model_parallel_world_size(self):
        return self.t.pp_size

    def get_pipeline_model_parallel_group(self):
        return self.t.pp_group

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group

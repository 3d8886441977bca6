"""Process topology for world = pp × dp × cp × tp, as one explicit object (no global state).

Rank order (Megatron's; also DeepSpeed's `PipeModelDataParallelTopology`, axes pipe, data, model,
with the context-parallel axis between data and model): tensor-parallel rank varies fastest,
then context-parallel, then data-parallel, then pipeline:

    rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank

so a tensor-parallel group is `tp` consecutive ranks (inside one node when tp ≤ GPUs per node),
a context-parallel group the `cp` ranks with the same (pp_rank, dp_rank, tp_rank), spaced `tp`
apart (next to each other after tp: its all-to-alls stay inside a node when tp × cp fits), a
data-parallel group the ranks with the same (pp_rank, cp_rank, tp_rank), and a pipeline group
the ranks with the same (dp_rank, cp_rank, tp_rank), spaced `tp * cp * dp` apart.
Example, world 8, tp 2, pp 2 (so dp 2, cp 1):

    tp groups  [0,1] [2,3] [4,5] [6,7]
    dp groups  [0,2] [1,3] [4,6] [5,7]
    pp groups  [0,4] [1,5] [2,6] [3,7]

Context-parallel ranks hold the same parameters and read the same samples, each a different
block of positions; for ZeRO and the gradient average they are data-parallel ranks. So there are
two "data" groups: `dp` (ranks reading different samples: the batch is split over it) and `grad`
= dp × cp (ranks holding the same parameters: ZeRO partitions and gradients are averaged over
it; equal to dp when cp = 1). Example, world 8, tp 2, cp 2 (dp 2):

    tp groups    [0,1] [2,3] [4,5] [6,7]
    cp groups    [0,2] [1,3] [4,6] [5,7]
    dp groups    [0,4] [1,5] [2,6] [3,7]
    grad groups  [0,2,4,6] [1,3,5,7]

`RankLayout` is the pure arithmetic (testable without processes); `Topology` adds the
torch.distributed groups. `torch.distributed.new_group` is collective over the whole world and
must be called with the same arguments in the same order on every rank, so `Topology` creates
every group of every kind on every rank and keeps the ones this rank belongs to.
`DeepSpeedMPU(topology)` is the `mpu=` object for `deepspeed.initialize` / `zero.Init`, so ZeRO
shards and averages over the grad (dp × cp) group only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["RankLayout", "Topology", "DeepSpeedMPU"]


@dataclass(frozen=True)
class RankLayout:
    """Which tp/cp/dp/pp coordinates and groups a rank has; pure arithmetic, no processes."""

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1

    def __post_init__(self):
        for name in ("world_size", "tp", "pp", "cp"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.world_size % (self.tp * self.pp * self.cp):
            raise ValueError(f"world size {self.world_size} is not divisible by tp × pp × cp = "
                             f"{self.tp}×{self.pp}×{self.cp}")

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int, cp_rank: int = 0) -> int:
        return ((pp_rank * self.dp + dp_rank) * self.cp + cp_rank) * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank (cp_rank: `cp_rank_of`)."""
        p, d, _, t = self.all_coords(rank)
        return p, d, t

    def cp_rank_of(self, rank: int) -> int:
        return self.all_coords(rank)[2]

    def all_coords(self, rank: int) -> tuple[int, int, int, int]:
        """(pp_rank, dp_rank, cp_rank, tp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        tp_rank = rank % self.tp
        cp_rank = (rank // self.tp) % self.cp
        dp_rank = (rank // (self.tp * self.cp)) % self.dp
        pp_rank = rank // (self.tp * self.cp * self.dp)
        return pp_rank, dp_rank, cp_rank, tp_rank

    def named_coords(self, rank: int) -> dict[str, int]:
        return dict(zip(("pp", "dp", "cp", "tp"), self.all_coords(rank)))

    def _replicas(self):
        """(pp, dp, cp) coordinates in rank order."""
        return [(p, d, c) for p in range(self.pp) for d in range(self.dp) for c in range(self.cp)]

    # Every group of a kind, in a fixed order (the order groups are created in).
    def tp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t, c) for t in range(self.tp)] for p, d, c in self._replicas()]

    def cp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t, c) for c in range(self.cp)]
                for p in range(self.pp) for d in range(self.dp) for t in range(self.tp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t, c) for d in range(self.dp)]
                for p in range(self.pp) for c in range(self.cp) for t in range(self.tp)]

    def grad_groups(self) -> list[list[int]]:
        """Ranks holding the same parameters (same pp_rank, tp_rank): dp × cp ranks, over which
        ZeRO partitions and gradients are averaged. The dp groups when cp = 1."""
        return [[self.rank_of(p, d, t, c) for d in range(self.dp) for c in range(self.cp)]
                for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t, c) for p in range(self.pp)]
                for d in range(self.dp) for c in range(self.cp) for t in range(self.tp)]

    def embed_groups(self) -> list[list[int]]:
        """First and last pipeline stage of each (dp_rank, cp_rank, tp_rank): the ranks holding the
        two copies of a tied embedding (empty when pp = 1: nothing to tie across stages)."""
        if self.pp == 1:
            return []
        return [[self.rank_of(0, d, t, c), self.rank_of(self.pp - 1, d, t, c)]
                for d in range(self.dp) for c in range(self.cp) for t in range(self.tp)]

    def model_parallel_groups(self) -> list[list[int]]:
        """Ranks holding one replica of the model (same dp_rank and cp_rank): tp × pp ranks."""
        return [sorted(self.rank_of(p, d, t, c) for p in range(self.pp) for t in range(self.tp))
                for d in range(self.dp) for c in range(self.cp)]

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
    """This rank's place in pp × dp × cp × tp and its process groups (see the module docstring).

    Creating it is collective: every rank of the world must construct it with the same tp, pp
    and cp. With world_size 1 (no process group started) all groups are None and all sizes 1.
    `dp_*` are the ranks reading different samples; `grad_*` the ranks holding the same
    parameters (dp × cp; the dp group itself when cp = 1); `cp_*` the ranks sharing sequences.
    """

    def __init__(self, world_size: int, rank: int, tp: int = 1, pp: int = 1, cp: int = 1):
        self.layout = RankLayout(world_size, tp, pp, cp)
        self.rank = rank
        self.pp_rank, self.dp_rank, self.cp_rank, self.tp_rank = self.layout.all_coords(rank)
        self.tp_size, self.pp_size, self.dp_size, self.cp_size = tp, pp, self.layout.dp, cp
        self.grad_size = self.dp_size * cp
        self.grad_rank = self.dp_rank * cp + self.cp_rank
        self.world_size = world_size
        L = self.layout
        self.tp_ranks = L.group_of(L.tp_groups(), rank)
        self.dp_ranks = L.group_of(L.dp_groups(), rank)
        self.cp_ranks = L.group_of(L.cp_groups(), rank)
        self.grad_ranks = L.group_of(L.grad_groups(), rank)
        self.pp_ranks = L.group_of(L.pp_groups(), rank)
        self.mp_ranks = L.group_of(L.model_parallel_groups(), rank)
        self._distributed = world_size > 1 or (dist.is_available() and dist.is_initialized())
        if self._distributed and not dist.is_initialized():
            raise RuntimeError("Topology with world_size > 1 needs torch.distributed initialised first")
        if self._distributed and dist.get_world_size() != world_size:
            raise ValueError(f"world_size {world_size} != torch.distributed world size {dist.get_world_size()}")
        self.tp_group = self._create(L.tp_groups())
        self.dp_group = self._create(L.dp_groups())
        # Without context parallelism no more groups than before: grad is dp, cp is this rank.
        self.cp_group = self._create(L.cp_groups()) if cp > 1 else None
        self.grad_group = self._create(L.grad_groups()) if cp > 1 else self.dp_group
        self.pp_group = self._create(L.pp_groups())
        self.mp_group = self._create(L.model_parallel_groups())
        self.embed_group = self._create(L.embed_groups())
        self.embed_ranks = next((g for g in L.embed_groups() if rank in g), None)
        self._sub: dict[int, object] = {}

    @classmethod
    def from_dist(cls, tp: int = 1, pp: int = 1, cp: int = 1) -> "Topology":
        """From the running torch.distributed world (or a world of one if none is running)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_world_size(), dist.get_rank(), tp, pp, cp)
        return cls(1, 0, tp, pp, cp)

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
                f"cp={self.cp_rank}/{self.cp_size}, dp={self.dp_rank}/{self.dp_size}, pp={self.pp_rank}/{self.pp_size})")


class DeepSpeedMPU:
    """The `mpu` object DeepSpeed (0.19) queries, backed by a Topology.

    "Model parallel" here means tensor parallel (Megatron's convention, which DeepSpeed's
    gradient-norm and ZeRO code follow: the norm of a parameter without `tensor_model_parallel`
    is counted on tensor-parallel rank 0 only, then summed over `get_model_parallel_group()`).
    Data-parallel queries return the grad group (dp × cp: every rank holding the same parameters,
    context-parallel ranks included), so ZeRO partitions and averages over it only.
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

    # data parallel, for ZeRO and the gradient average: dp × cp
    def get_data_parallel_rank(self):
        return self.t.grad_rank

    def get_data_parallel_world_size(self):
        return self.t.grad_size

    def get_data_parallel_group(self):
        return self.t.grad_group

    def get_data_parallel_group_ranks(self):
        return list(self.t.grad_ranks)

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

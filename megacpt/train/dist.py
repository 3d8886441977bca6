"""Rank discovery and process-group start-up for every launcher we support.

deepspeed / torchrun set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT. Under `srun` with one
task per rank we read SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (the batch script exports
MASTER_ADDR/PORT); under `mpirun` (Open MPI) OMPI_COMM_WORLD_*. A bare `megacpt train` is a
world of one on a free local port.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

_ENV_MAPS = [
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int


def discover() -> DistInfo:
    """Rank, world size and local rank from the launcher's environment (no process group yet)."""
    for r, w, lr in _ENV_MAPS:
        if r in os.environ and w in os.environ:
            # Under srun inside an sbatch allocation SLURM_* exist even for a plain `megacpt train`
            # in the batch shell; SLURM_STEP_ID distinguishes a real srun step.
            if r == "SLURM_PROCID" and "SLURM_STEP_ID" not in os.environ:
                continue
            return DistInfo(int(os.environ[r]), int(os.environ[w]), int(os.environ.get(lr, 0)))
    return DistInfo(0, 1, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(timeout_s: float = 1800.0) -> DistInfo:
    """Start torch.distributed (via DeepSpeed, which keeps its own comm wrapper in sync)."""
    import datetime

    import deepspeed
    import torch

    info = discover()
    os.environ["RANK"] = str(info.rank)
    os.environ["WORLD_SIZE"] = str(info.world_size)
    os.environ["LOCAL_RANK"] = str(info.local_rank)
    if info.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    elif "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        from megacpt.errors import UserError

        raise UserError("MASTER_ADDR/MASTER_PORT are not set; start ranks with deepspeed, torchrun, srun via slurm/cpt.sh or mpirun")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        rank=info.rank,
        world_size=info.world_size,
    )
    return info

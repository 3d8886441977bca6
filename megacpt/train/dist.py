"""Rank discovery and process-group start-up for every launcher we support.

deepspeed / torchrun set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT. Under `srun` with one
task per rank we read SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (the batch script exports
MASTER_ADDR/PORT); under `mpirun` (Open MPI) OMPI_COMM_WORLD_*, or PMI_* (MPICH, Intel MPI). Under
mpirun MASTER_ADDR/MASTER_PORT may be left unset: rank 0 then picks its address and a free port
and mpi4py broadcasts them (`_mpi_rendezvous`). A bare `megacpt train` is a world of one on a
free local port.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist

from megacpt.errors import UserError

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


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _under_mpi() -> bool:
    return "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ


def _routable_address() -> str:
    """An IPv4 address of this host that other hosts can reach (not 127.x), else the host name."""
    host = socket.gethostname()
    try:
        addrs = [ai[4][0] for ai in socket.getaddrinfo(host, None, socket.AF_INET)]
    except OSError:
        addrs = []
    for a in addrs:
        if not a.startswith("127."):
            return a
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:  # picks the interface of the default route; a UDP connect sends nothing
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return host


def _mpi_rendezvous(info: DistInfo) -> None:
    """Under mpirun without MASTER_ADDR/MASTER_PORT: rank 0's address and a free port, via mpi4py."""
    try:
        from mpi4py import MPI  # optional: only mpirun launches without MASTER_* need it
    except ImportError:
        raise UserError("under mpirun, export MASTER_ADDR and MASTER_PORT to every rank "
                        "(mpirun -x MASTER_ADDR=HOST -x MASTER_PORT=PORT) or pip install mpi4py") from None
    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (info.rank, info.world_size):
        raise RuntimeError(f"MPI says rank {comm.Get_rank()} of {comm.Get_size()}, the environment "
                           f"rank {info.rank} of {info.world_size}")
    hosts = comm.allgather(socket.gethostname())
    pair = None
    if info.rank == 0:
        one_host = len(set(hosts)) == 1
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if one_host else _routable_address())
        port = os.environ.get("MASTER_PORT") or str(_free_port("127.0.0.1" if one_host else ""))
        pair = (addr, port)
    addr, port = comm.bcast(pair, root=0)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port


def init(timeout_s: float = 1800.0) -> DistInfo:
    """Start torch.distributed (via DeepSpeed, which keeps its own comm wrapper in sync)."""
    info = discover()
    os.environ["RANK"] = str(info.rank)
    os.environ["WORLD_SIZE"] = str(info.world_size)
    os.environ["LOCAL_RANK"] = str(info.local_rank)
    if info.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    elif ("MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ) and _under_mpi():
        _mpi_rendezvous(info)
    elif "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise UserError("MASTER_ADDR/MASTER_PORT are not set; start ranks with deepspeed, torchrun, srun via slurm/cpt.sh or mpirun")
    # On GPUs our own small collectives (token counts, stop flags, checkpoint agreement) use CPU
    # tensors: give those gloo and everything on CUDA tensors NCCL.
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        rank=info.rank,
        world_size=info.world_size,
    )
    _default_group_timeout(datetime.timedelta(seconds=timeout_s))
    return info


def _default_group_timeout(timeout) -> None:
    """Groups created after init (megacpt's tp/dp groups, DeepSpeed's clone of the world that its
    gradient and ZeRO collectives use) get torch's default timeout (30 min on gloo, 10 on NCCL)
    unless told otherwise: give them the run's train.collective_timeout_s as well."""
    real = getattr(dist.new_group, "_megacpt_real", dist.new_group)

    def new_group(*args, timeout=None, **kwargs):
        return real(*args, timeout=timeout if timeout is not None else new_group.timeout, **kwargs)

    new_group._megacpt_real = real
    new_group.timeout = timeout
    dist.new_group = new_group


def release_shm_names(rank: int) -> None:
    """DeepSpeed's CPU all-reduce maps a /dev/shm segment per rank and never unlinks it (69 MB of
    RAM per rank and launch, piling up across runs). Once every rank has mapped every segment
    the names are no longer needed: the mappings outlive them."""
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}"
            f"_{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(name)
    except OSError:
        pass

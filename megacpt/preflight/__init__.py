"""`megacpt preflight`: check a launch before a long job.

Run it under the same launcher as the training (srun, deepspeed, torchrun, mpirun); it

1. starts the process group exactly as training does (megacpt.train.dist),
2. all-reduces a tensor whose sum is known and checks every element on every rank,
3. times an all-reduce of a larger payload (bus bandwidth, as nccl-tests reports it),
4. gathers each rank's host, device, free/total memory and CPUs, and
5. prints one table on rank 0 and a verdict; every rank exits 1 when anything is wrong
   (a wrong sum, two ranks on one GPU, a duplicated local rank, different torch versions).

    srun python -m megacpt.preflight
    deepspeed --num_gpus 8 --module megacpt.preflight
    mpirun -np 8 python -m megacpt.preflight
    MEGACPT_PREFLIGHT=1 sbatch slurm/cpt.sh CONFIG.yaml      # before training

A rank that never arrives shows as a time-out after --timeout seconds, not a hang.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from megacpt.errors import UserError
from megacpt.train import dist as mdist

# The known tensor: element i of rank r is ((r % 7) + 1) * ((i % 5) + 1). Sums stay small
# integers (at most 35 × world size), which float32 holds exactly: any difference is an error.
CHECK_NUMEL = 1031  # odd on purpose: not a multiple of any bucket or vector width


def known_values(rank: int, numel: int = CHECK_NUMEL) -> list[float]:
    return [float(((rank % 7) + 1) * ((i % 5) + 1)) for i in range(numel)]


def expected_sum(world: int, numel: int = CHECK_NUMEL) -> list[float]:
    ranks = sum((r % 7) + 1 for r in range(world))
    return [float(ranks * ((i % 5) + 1)) for i in range(numel)]


def max_error(result, world: int) -> float:
    """Largest absolute difference between an all-reduced known tensor and its expected sum."""
    import torch  # lazy: `--help` and the pure helpers stay free of torch

    want = torch.tensor(expected_sum(world, result.numel()), dtype=torch.float64)
    return float((result.detach().double().cpu().flatten() - want).abs().max())


def bus_bandwidth(nbytes: int, seconds: float, world: int) -> float:
    """GB/s moved per rank by a ring all-reduce of nbytes in `seconds` (nccl-tests' busbw)."""
    if seconds <= 0 or world < 2:
        return 0.0
    return 2 * (world - 1) / world * nbytes / seconds / 1e9


def find_problems(rows: list[dict]) -> list[str]:
    """What is wrong with a launch, from every rank's row (pure: all ranks reach the same verdict)."""
    problems = []
    for r in rows:
        if not r["allreduce_ok"]:
            problems.append(f"rank {r['rank']} on {r['host']}: all-reduce of the known tensor is wrong "
                            f"(max error {r['allreduce_error']:g})")
    seen_local: dict = {}
    seen_dev: dict = {}
    for r in rows:
        key = (r["host"], r["local_rank"])
        if key in seen_local:
            problems.append(f"ranks {seen_local[key]} and {r['rank']} on {r['host']} both have local rank {r['local_rank']}")
        seen_local.setdefault(key, r["rank"])
        if r.get("device_uuid"):
            key = (r["host"], r["device_uuid"])
            if key in seen_dev:
                problems.append(f"ranks {seen_dev[key]} and {r['rank']} on {r['host']} share one GPU ({r['device']}); "
                                f"start one rank per GPU")
            seen_dev.setdefault(key, r["rank"])
    versions = sorted({r["torch"] for r in rows})
    if len(versions) > 1:
        problems.append("ranks run different torch versions: " + ", ".join(versions))
    return problems


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def format_table(rows: list[dict]) -> str:
    head = ["rank", "host", "local", "device", "free GiB", "total GiB", "cpus", "all-reduce"]
    body = [[str(r["rank"]), r["host"], str(r["local_rank"]), r["device"], _gib(r["mem_free"]), _gib(r["mem_total"]),
             str(r["cpus"]), "ok" if r["allreduce_ok"] else f"WRONG ({r['allreduce_error']:g})"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def _host_memory() -> tuple[int | None, int | None]:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()}
        return info.get("MemAvailable"), info.get("MemTotal")
    except (OSError, ValueError, IndexError):
        return None, None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _rank_row(info, device, err: float) -> dict:
    import torch  # lazy: `--help` and the pure helpers stay free of torch

    row = {"rank": info.rank, "local_rank": info.local_rank, "host": socket.gethostname(), "pid": os.getpid(),
           "cpus": _cpus(), "torch": torch.__version__, "allreduce_error": err, "allreduce_ok": err == 0.0,
           "device_uuid": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        row.update(device=f"cuda:{device.index} {props.name}", mem_free=free, mem_total=total,
                   device_uuid=str(getattr(props, "uuid", "")) or f"index{device.index}")
    else:
        free, total = _host_memory()
        row.update(device="cpu", mem_free=free, mem_total=total)
    return row


def preflight(timeout_s: float, size_mb: float | None, json_out: str | None) -> int:
    # Lazy: `--help` and the pure helpers stay free of torch.
    import torch
    import torch.distributed as dist

    t0 = time.perf_counter()
    info = mdist.discover()
    try:
        info = mdist.init(timeout_s=timeout_s)  # UserError (no MASTER_ADDR/PORT) passes through: exit 2
    except UserError:
        raise
    except Exception as e:  # a rank that never arrives, an unreachable master, a bad interface
        print(f"preflight FAILED on rank {info.rank} ({socket.gethostname()}): could not start the process group "
              f"with {info.world_size} ranks at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}: {e}",
              file=sys.stderr, flush=True)
        return 1
    try:
        rendezvous_s = time.perf_counter() - t0
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

        x = torch.tensor(known_values(rank), dtype=torch.float32, device=device)
        dist.all_reduce(x)
        err = max_error(x, world)

        mb = size_mb if size_mb is not None else (64.0 if device.type == "cuda" else 8.0)
        numel = max(1, int(mb * 2**20) // 4)
        payload = torch.ones(numel, dtype=torch.float32, device=device)
        dist.all_reduce(payload)  # warm-up; also a second correctness check
        if not bool((payload == world).all()):
            err = max(err, float((payload - world).abs().max()))
        iters = 5
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(payload)
        _sync(device)
        per_iter = (time.perf_counter() - t1) / iters
        busbw = bus_bandwidth(numel * 4, per_iter, world)

        row = _rank_row(info, device, err)
        rows: list = [None] * world
        dist.all_gather_object(rows, row)
        problems = find_problems(rows)
        if rank == 0:
            hosts = len({r["host"] for r in rows})
            print(format_table(rows), flush=True)
            line = f"process group up in {rendezvous_s:.1f}s (master {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})"
            if world > 1:
                line += f"; all-reduce of {numel * 4 / 2**20:.0f} MiB: {per_iter * 1e3:.1f} ms, bus bandwidth {busbw:.2f} GB/s"
            print(line, flush=True)
            if json_out:
                with open(json_out, "w") as f:
                    json.dump({"ranks": rows, "problems": problems, "busbw_gbps": busbw,
                               "rendezvous_s": rendezvous_s}, f, indent=2)
            if problems:
                print("preflight FAILED:\n  " + "\n  ".join(problems), file=sys.stderr, flush=True)
            else:
                print(f"preflight OK: {world} ranks on {hosts} host(s), all-reduce correct", flush=True)
        dist.barrier()
        return 1 if problems else 0
    except Exception as e:
        print(f"preflight FAILED on rank {info.rank} ({socket.gethostname()}): {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _sync(device) -> None:
    if device.type == "cuda":
        import torch  # lazy: `--help` and the pure helpers stay free of torch

        torch.cuda.synchronize(device)


def run(args) -> int:
    """`megacpt preflight` and `python -m megacpt.preflight` (parser: megacpt/cli/preflight.py)."""
    if args.timeout <= 0:
        raise UserError(f"--timeout {args.timeout} must be > 0 seconds")
    if args.size_mb is not None and args.size_mb <= 0:
        raise UserError(f"--size-mb {args.size_mb} must be > 0")
    return preflight(args.timeout, args.size_mb, args.json_out)

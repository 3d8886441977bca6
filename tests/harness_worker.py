"""Rank side of tests/harness.py: `python harness_worker.py SPEC RANK` runs every scenario of the
JSON file SPEC in order and writes each one's outcome on this rank to a JSON file.

Each scenario gets a fresh gloo process group (so a scenario that failed on one rank, leaving the
others in a collective until it closes or times out, does not poison the next one) and is called
as `function(rank, world, out_dir, **kwargs)`; it returns a JSON-able value or None.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist


def _rendezvous(store, key: str, world: int, timeout: timedelta) -> None:
    """Every rank reaches `key` before any goes on: after a failure, some ranks leave the
    scenario at once and others only when their pending collective gives up."""
    if store.add(key, 1) == world:
        store.set(f"{key}/all", "1")
    store.wait([f"{key}/all"], timeout)


def _destroy_groups() -> None:
    if not dist.is_initialized():  # the scenario destroyed them itself
        return
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and ds_comm.cdb is not None:
        ds_comm.destroy_process_group()  # also drops DeepSpeed's cached groups (world clone, dp, mp)
    else:
        dist.destroy_process_group()


def _call(scenario: dict, rank: int, world: int, op_timeout: timedelta, store):
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=op_timeout)
    module, _, name = scenario["target"].partition(":")
    fn = getattr(importlib.import_module(module), name)
    value = fn(rank, world, Path(scenario["out"]), **scenario["kwargs"])
    json.dumps(value)  # a result that cannot be reported is the scenario's error
    return value


def _write(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)  # the parent never reads half a file


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    rank, world = int(argv[1]), spec["world"]
    results = Path(spec["results"])
    store = dist.FileStore(spec["store"], world)
    op_timeout = timedelta(seconds=spec["op_timeout"])
    scenarios = spec["scenarios"]
    for i, scenario in enumerate(scenarios):
        try:
            _rendezvous(store, f"enter{i}", world, timedelta(seconds=spec["timeout"]))
        except RuntimeError as e:  # a rank died or hangs: nothing more can run in this world
            for j in range(i, len(scenarios)):
                _write(results / f"{j}.{rank}.json", {"ok": False, "seconds": 0.0,
                                                      "error": f"not run: ranks did not meet ({e})"})
            return 1
        print(f"[harness] rank {rank}: {scenario['name']}", flush=True)
        start = time.perf_counter()
        try:
            result = {"ok": True, "value": _call(scenario, rank, world, op_timeout,
                                                 dist.PrefixStore(f"scenario{i}", store))}
        except (Exception, SystemExit):
            result = {"ok": False, "error": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - start, 3)
        # Peers still waiting on this rank in a collective see its connections close here
        # (gc frees the groups the scenario's objects held) instead of waiting op_timeout.
        _destroy_groups()
        gc.collect()
        _write(results / f"{i}.{rank}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

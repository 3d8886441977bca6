"""tests/harness.py itself: one 2-rank launch of scenarios defined here, some of which fail."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import harness
from harness import Failed, Scenario, need_gloo, run_scenarios


def sums_ranks(rank, world, out, offset):
    t = torch.tensor([float(rank + offset)])
    dist.all_reduce(t)
    if rank == 0:
        (out / "from_rank0").write_text("shared")
    dist.barrier()
    return {"sum": float(t), "world": world, "shared": (out / "from_rank0").read_text()}


def fails_on_rank1_while_rank0_waits(rank, world, out):
    if rank == 1:
        raise ValueError("rank 1 gives up before the collective")
    dist.barrier()  # rank 1 never joins: rank 0 must come out of here with an error
    return "unreachable"


def returns_no_json(rank, world, out):
    return object()


@pytest.mark.slow
def test_every_scenario_runs_and_reports_in_one_launch(tmp_path):
    need_gloo(deepspeed=False)
    scenarios = [Scenario("test_harness:sums_ranks", {"offset": 1}, name="before"),
                 "test_harness:fails_on_rank1_while_rank0_waits",
                 "test_harness:returns_no_json",
                 Scenario("test_harness:sums_ranks", {"offset": 10}, name="after")]
    # op_timeout bounds rank 0's wait should rank 1's closed connections not end it sooner.
    results = run_scenarios(2, scenarios, tmp_path, timeout=300, op_timeout=60, check=False)
    assert list(results) == ["before", "test_harness:fails_on_rank1_while_rank0_waits",
                             "test_harness:returns_no_json", "after"]
    assert results["before"] == {r: {"sum": 3.0, "world": 2, "shared": "shared"} for r in (0, 1)}
    # Fresh process group after the failure: the last scenario's collectives work.
    assert results["after"] == {r: {"sum": 21.0, "world": 2, "shared": "shared"} for r in (0, 1)}
    failed = results["test_harness:fails_on_rank1_while_rank0_waits"]
    assert isinstance(failed[1], Failed) and "ValueError: rank 1 gives up" in failed[1].error
    assert isinstance(failed[0], Failed) and "unreachable" not in repr(failed[0])
    assert all(isinstance(v, Failed) and "not JSON serializable" in v.error
               for v in results["test_harness:returns_no_json"].values())
    with pytest.raises(pytest.fail.Exception) as e:
        harness._check(results, 2, "")
    message = str(e.value)
    assert message.startswith("2 of 4 scenario(s) failed (2 ranks, one launch)")
    assert "===== test_harness:fails_on_rank1_while_rank0_waits: rank 1 =====" in message
    assert "rank 1 gives up before the collective" in message and "===== before" not in message

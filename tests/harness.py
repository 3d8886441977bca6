"""Multi-process tests: many scenarios per launch.

Starting ranks (a Python each, importing torch and often deepspeed) costs more than most checks
they run, so a test hands run_scenarios() every scenario it needs and they all run, in order, in
one launch of `nproc` ranks (tests/harness_worker.py). A scenario is a function of a module
importable from tests/ (or an installed one):

    def my_scenario(rank: int, world: int, out: Path, **kwargs) -> JSON-able | None

called on every rank inside a fresh gloo process group (build topologies in the scenario), with
`out` a folder of its own shared by the ranks and `kwargs` from the Scenario (JSON-able). A
scenario that raises on some rank is reported with that rank's traceback; the others still run.
A rank that dies (or a launch past its timeout) ends the launch: what had not run reports that.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import REPO, cpu_env, free_port


def need_gloo(deepspeed: bool = True) -> None:
    """Skip the calling test where torch has no gloo backend (or DeepSpeed is missing)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if deepspeed:
        pytest.importorskip("deepspeed")

TESTS = Path(__file__).resolve().parent
# Room for one rank's traceback in a failure message.
TRACEBACK_CHARS = 6000


@dataclass(frozen=True)
class Scenario:
    target: str  # "module:function"
    kwargs: dict = field(default_factory=dict)
    name: str = ""  # unique within a launch; the target when empty

    @property
    def label(self) -> str:
        return self.name or self.target


@dataclass(frozen=True)
class Failed:
    """A scenario's outcome on a rank where it returned nothing: its traceback, or why it has none."""
    error: str


def run_scenarios(nproc: int, scenarios: list, tmp_dir, timeout: float = 900, op_timeout: float = 300,
                  check: bool = True) -> dict[str, dict[int, object]]:
    """Run every scenario (a Scenario or a "module:function" string) in one launch of nproc ranks.

    Returns {scenario label: {rank: returned value, or Failed}}. With check=True (the default)
    the test fails, after all scenarios ran, listing each failed scenario with its tracebacks.
    `timeout` bounds the launch; `op_timeout` bounds one collective, which is how long the other
    ranks may wait when a scenario fails on one rank without closing its connections.
    """
    scenarios = [s if isinstance(s, Scenario) else Scenario(s) for s in scenarios]
    labels = [s.label for s in scenarios]
    assert len(set(labels)) == len(labels), f"scenario names repeat: {labels}"
    root = Path(tmp_dir) / f"harness{len(list(Path(tmp_dir).glob('harness*')))}"
    (root / "results").mkdir(parents=True)
    spec = {"world": nproc, "store": str(root / "store"), "results": str(root / "results"), "timeout": timeout,
            "op_timeout": op_timeout, "scenarios": []}
    for i, s in enumerate(scenarios):
        out = root / f"{i:02d}_{''.join(c if c.isalnum() else '_' for c in s.label)[:60]}"
        out.mkdir()
        spec["scenarios"].append({"name": s.label, "target": s.target, "kwargs": s.kwargs, "out": str(out)})
    (root / "spec.json").write_text(json.dumps(spec, indent=1))
    start = time.monotonic()
    launch_problem = _launch(nproc, root, timeout)
    results = _collect(scenarios, nproc, root, launch_problem)
    print(f"harness: {nproc} ranks, {len(scenarios)} scenarios, {time.monotonic() - start:.1f} s; "
          + ", ".join(f"{s.label} {_seconds(root, i, nproc):.1f} s" for i, s in enumerate(scenarios)))
    if check:
        _check(results, nproc, launch_problem)
    return results


def _launch(nproc: int, root: Path, timeout: float) -> str:
    """Start the ranks and wait for them; '' when all exited 0, else what went wrong (with logs)."""
    port = free_port()  # MASTER_PORT as a launcher sets it (DeepSpeed names its CPU shm after it)
    procs = []
    for rank in range(nproc):
        env = cpu_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with open(root / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(TESTS / "harness_worker.py"), str(root / "spec.json"),
                                           str(rank)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    problem = ""
    while any(p.poll() is None for p in procs):
        # A rank that exits early leaves a world no later scenario can run in.
        dead = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if dead or time.monotonic() > deadline:
            problem = (f"rank(s) {dead} exited early" if dead else f"launch timed out after {timeout:.0f} s")
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            break
        time.sleep(0.2)
    codes = [p.returncode for p in procs]
    if problem or any(codes):
        problem = (problem or "a rank failed") + f"; exit codes {codes}\n" + "\n".join(
            f"--- rank {r} log (tail) ---\n{(root / f'rank{r}.log').read_text(errors='replace')[-3000:]}"
            for r in range(nproc))
    return problem


def _result_file(root: Path, i: int, rank: int) -> Path:
    return root / "results" / f"{i}.{rank}.json"


def _seconds(root: Path, i: int, nproc: int) -> float:
    files = [_result_file(root, i, r) for r in range(nproc)]
    return max((json.loads(f.read_text())["seconds"] for f in files if f.exists()), default=0.0)


def _collect(scenarios: list[Scenario], nproc: int, root: Path, launch_problem: str) -> dict:
    results = {}
    for i, s in enumerate(scenarios):
        per_rank = {}
        for rank in range(nproc):
            f = _result_file(root, i, rank)
            if not f.exists():
                per_rank[rank] = Failed("no result: " + (launch_problem.partition("\n")[0] or "missing"))
                continue
            r = json.loads(f.read_text())
            per_rank[rank] = r["value"] if r["ok"] else Failed(r["error"])
        results[s.label] = per_rank
    return results


def _check(results: dict, nproc: int, launch_problem: str) -> None:
    failed = {label: {r: v.error for r, v in per_rank.items() if isinstance(v, Failed)}
              for label, per_rank in results.items()}
    failed = {label: errors for label, errors in failed.items() if errors}
    if not failed and not launch_problem:
        return
    parts = [f"{len(failed)} of {len(results)} scenario(s) failed ({nproc} ranks, one launch)"]
    for label, errors in failed.items():
        for rank, error in errors.items():
            parts.append(f"===== {label}: rank {rank} =====\n{error[-TRACEBACK_CHARS:]}")
    if launch_problem:
        parts.append(f"===== launch =====\n{launch_problem}")
    pytest.fail("\n".join(parts), pytrace=False)

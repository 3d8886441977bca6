"""Launching a benchmark's ranks: the `deepspeed` launcher with a pinned environment, a monitor
of each rank's peak memory and CPU time while it runs, and what is left to clean up or report
when it ends. Shared by `megacpt bench train` and `megacpt bench memory`.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from megacpt.errors import UserError

REPO = Path(__file__).resolve().parents[2]

# The pinned variables bench_env sets that the JSON's "environment" records (--env items join them).
RECORDED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher() -> str:
    cand = Path(sys.executable).parent / "deepspeed"
    if cand.exists():
        return str(cand)
    found = shutil.which("deepspeed")
    if not found:
        raise UserError("the deepspeed launcher is not on PATH; install deepspeed")
    return found


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_env(items: list[str]) -> dict:
    """--env NAME=VALUE items as a dict; names the launcher or the thread pinning owns are refused."""
    out = {}
    owned = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
             "MASTER_ADDR", "MASTER_PORT"}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UserError(f"--env {item!r}: expected NAME=VALUE")
        if name in owned:
            raise UserError(f"--env {name}: set by the bench itself (use --threads for thread counts)")
        out[name] = value
    return out


def bench_env(threads: int) -> dict:
    """The environment every rank of every system gets (thread settings pinned explicitly)."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    return env


# ----------------------------------------------------------------------------- per-rank memory


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _rank_pids(root: int) -> dict[int, int]:
    """local rank -> pid, for descendants of `root` started with --local_rank=N."""
    kids = _children_map()
    out, stack = {}, list(kids.get(root, []))
    while stack:
        pid = stack.pop()
        stack.extend(kids.get(pid, []))
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for a in args:
            if a.startswith(b"--local_rank="):
                out[int(a.split(b"=", 1)[1])] = pid
    return out


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RankMonitor(threading.Thread):
    """Watches the ranks of one launch (descendants of the launcher with `--local_rank=N`).

    Every `interval` seconds: each rank's VmHWM (until `progress()` reaches `freeze_step`), and,
    whenever `progress()` (the last completed step) has advanced, the CPU seconds (utime+stime)
    all ranks have used so far: `cpu_marks` = [(step, cpu_s)], for CPU time per step.
    """

    def __init__(self, root_pid: int, expected: int, progress=None, freeze_step: int | None = None,
                 interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.expected, self.interval = root_pid, expected, interval
        self.progress = progress or (lambda: 0)
        self.freeze_step = freeze_step
        self.peaks: dict[int, float] = {}
        self.cpu_marks: list[tuple[int, float, float]] = []  # (step, CPU s of all ranks, monotonic time)
        self.stop = threading.Event()

    def run(self):
        if not os.path.isdir("/proc"):
            return
        pids: dict[int, int] = {}
        last = -1
        while not self.stop.is_set():
            step = self.progress()
            if len(pids) < self.expected:
                pids.update(_rank_pids(self.root))
            if self.freeze_step is None or step < self.freeze_step:
                for r, pid in pids.items():
                    v = _vm_hwm_mb(pid)
                    if v is not None:
                        self.peaks[r] = max(self.peaks.get(r, 0.0), v)
            if step > last and len(pids) >= self.expected:
                cpu = [_cpu_seconds(pid) for pid in pids.values()]
                if all(c is not None for c in cpu):
                    self.cpu_marks.append((step, sum(cpu), time.monotonic()))
                    last = step
            self.stop.wait(self.interval)


# ----------------------------------------------------------------------------- runs


def run_launcher(cmd: list[str], env: dict, log_path: Path, timeout: float, expected: int = 1, progress=None,
                 freeze_step: int | None = None) -> tuple[int, float, RankMonitor]:
    """Run a launcher command; (exit code, wall seconds, the finished RankMonitor)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        mon = RankMonitor(proc.pid, expected, progress, freeze_step)
        mon.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
        mon.stop.set()
        mon.join(timeout=5)
    remove_shm_buffers(cmd)
    return rc, time.perf_counter() - t0, mon


def remove_shm_buffers(cmd: list[str]) -> int:
    """Delete the /dev/shm segments DeepSpeed's CPU shared-memory all-reduce left behind.

    On CPU every rank of a local launch creates /dev/shm/deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK
    (~69 MB, tmpfs, i.e. RAM) and DeepSpeed 0.19 never unlinks it; each launch leaks nproc of them.
    Called once the launch (which used the master port in `cmd`) has ended.
    """
    if "--master_port" not in cmd:
        return 0
    port = cmd[cmd.index("--master_port") + 1]
    n = 0
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        try:
            os.unlink(path)
            n += 1
        except OSError:
            pass
    return n


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def fail(what: str, rc: int, log: Path) -> None:
    """Raise for a launch that exited with `rc`: UserError when its log ends in the CLI's one-line
    `error:` (bad input, exit 2 here too), else RuntimeError; both quote the log's tail."""
    tail = _tail(log)
    bad_input = "\nerror: " in "\n" + tail and rc != 124
    msg = f"{what} failed (exit {rc}{', timed out' if rc == 124 else ''}); log {log}:\n{tail}"
    if bad_input:
        raise UserError(msg)
    raise RuntimeError(msg)

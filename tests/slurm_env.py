"""A one-node Slurm cluster on this machine for the launcher tests (and helpers to use it).

`ensure_slurm()` installs Debian's slurm-wlm and munge when they are missing (root only), writes a
munge key and /etc/slurm/slurm.conf (shared/REFERENCES.md §5), starts munged, slurmctld and slurmd,
and waits until the node is idle. It is idempotent: a healthy running cluster is reused, and a
slurm.conf that these tests did not write is never overwritten. Anything that prevents a working
cluster raises `Unavailable` with the reason; the fixtures turn that into a skip with that message.

`ensure_mpi()` does the same for Open MPI (Debian openmpi-bin) and mpi4py (PyPI).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

MARK = "# written by megacpt tests/slurm_env.py"
SLURM_CONF = Path("/etc/slurm/slurm.conf")
MUNGE_KEY = Path("/etc/munge/munge.key")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


class Unavailable(Exception):
    """Slurm (or MPI) cannot be set up here; the message says why."""


def _run(cmd, timeout=120, check=False, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise Unavailable(f"`{' '.join(map(str, cmd))}` failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
    return r


def _apt_install(packages: list[str], why: str) -> None:
    if os.geteuid() != 0:
        raise Unavailable(f"{why} needs Debian packages {' '.join(packages)}; not root, cannot install them")
    if shutil.which("apt-get") is None:
        raise Unavailable(f"{why} needs {' '.join(packages)}; no apt-get on this machine")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update"], timeout=600, env=env)
    r = _run(["apt-get", "install", "-y", "--no-install-recommends", *packages], timeout=1200, env=env)
    if r.returncode != 0:
        raise Unavailable(f"apt-get install {' '.join(packages)} failed: {(r.stderr or r.stdout).strip()[-800:]}")


# ---------------------------------------------------------------------------------------- Slurm


def _host() -> str:
    return socket.gethostname().split(".")[0]


def slurm_conf_text(host: str, cpus: int) -> str:
    return f"""{MARK}
ClusterName=megacpt
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
# A requeued job waits for the launch credential to expire (default 120 s); keep that short.
AuthInfo=cred_expire=30
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# The main scheduling loop runs every 60 s by default: a requeued job would idle that long.
SchedulerParameters=sched_interval=2
JobRequeue=1
ReturnToService=2
MpiDefault=none
KillWait=10
MinJobAge=600
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _pids(name: str) -> list[int]:
    r = _run(["pgrep", "-x", name])
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def _ctld_up() -> bool:
    r = _run(["scontrol", "ping"], timeout=30)
    return r.returncode == 0 and "UP" in r.stdout


def node_state(host: str | None = None) -> str:
    r = _run(["sinfo", "-h", "-N", "-n", host or _host(), "-o", "%T"], timeout=30)
    return r.stdout.strip().lower() if r.returncode == 0 else ""


def _healthy() -> bool:
    if not (_pids("munged") and _pids("slurmctld") and _pids("slurmd")):
        return False
    if not _ctld_up():
        return False
    state = node_state()
    return bool(state) and not any(s in state for s in ("down", "drain", "fail", "unknown", "not_responding"))


def _start_daemons(host: str) -> None:
    for d in ("/var/lib/slurm/slurmctld", "/var/lib/slurm/slurmd", "/var/log/slurm", "/run/munge", "/var/log/munge",
              "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        MUNGE_KEY.write_bytes(os.urandom(1024))
    shutil.chown(MUNGE_KEY, "munge", "munge")
    MUNGE_KEY.chmod(0o400)
    for d in ("/etc/munge", "/run/munge", "/var/log/munge", "/var/lib/munge"):
        shutil.chown(d, "munge", "munge")
    if not _pids("munged"):
        _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    r = _run(["bash", "-c", "munge -n | unmunge"], timeout=30)
    if r.returncode != 0:
        raise Unavailable(f"munge does not work: {r.stderr.strip()[-400:]}")
    if not _pids("slurmctld"):
        _run(["slurmctld"], check=True)
    if not _pids("slurmd"):
        _run(["slurmd"], check=True)


def ensure_slurm(timeout: float = 90) -> dict:
    """A working one-node Slurm; returns {'host', 'cpus'}. Raises Unavailable with the reason."""
    host = _host()
    cpus = os.cpu_count() or 1
    if cpus < 2:
        raise Unavailable("the Slurm tests run 2 tasks and need 2 CPUs")
    want = slurm_conf_text(host, cpus)
    text = SLURM_CONF.read_text() if SLURM_CONF.exists() else None
    outdated = text is not None and MARK in text and text != want  # ours, from an older version of this file
    if all(shutil.which(b) for b in ("sbatch", "scontrol", "slurmctld", "slurmd")) and not outdated and _healthy():
        return {"host": host, "cpus": cpus}
    if os.geteuid() != 0:
        raise Unavailable("no running Slurm cluster, and starting one (and installing slurm-wlm/munge) needs root")
    if not all(shutil.which(b) for b in ("sbatch", "slurmctld", "slurmd", "munged")):
        _apt_install(["slurm-wlm", "munge"], "the Slurm tests")
        if not all(shutil.which(b) for b in ("sbatch", "slurmctld", "slurmd", "munged")):
            raise Unavailable("slurm-wlm/munge installed but sbatch/slurmctld/slurmd/munged are not on PATH")
    if SLURM_CONF.exists() and MARK not in SLURM_CONF.read_text():
        raise Unavailable(f"{SLURM_CONF} exists and was not written by these tests; not touching a real cluster's config "
                          f"(and its daemons are not healthy)")
    if not SLURM_CONF.exists() or SLURM_CONF.read_text() != want:
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(want)
        for name in ("slurmd", "slurmctld"):  # restart with the new config
            for pid in _pids(name):
                os.kill(pid, 15)
        deadline = time.time() + 20
        while (_pids("slurmd") or _pids("slurmctld")) and time.time() < deadline:
            time.sleep(0.5)
    _start_daemons(host)
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        if _ctld_up():
            state = node_state(host)
            if any(s in state for s in ("drain", "down")) and "not_responding" not in state:
                _run(["scontrol", "update", f"nodename={host}", "state=resume"])
            elif state and not any(s in state for s in ("unknown", "not_responding", "down", "drain", "fail")):
                return {"host": host, "cpus": cpus}
        time.sleep(1)
    log = ""
    for f in ("/var/log/slurm/slurmctld.log", "/var/log/slurm/slurmd.log"):
        try:
            log += f"\n--- {f}\n" + "\n".join(Path(f).read_text().splitlines()[-15:])
        except OSError:
            pass
    raise Unavailable(f"Slurm did not come up within {timeout:.0f}s (node state {state!r}){log}")


# ---------------------------------------------------------------------------------------- jobs


def sbatch(args: list[str], env: dict, cwd) -> int:
    r = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise AssertionError(f"sbatch {args} failed: {r.stderr.strip()}")
    return int(r.stdout.strip().split(";")[0])


def job_info(job_id: int) -> dict:
    r = _run(["scontrol", "show", "job", "-o", str(job_id)], timeout=30)
    if r.returncode != 0:
        return {}
    first = r.stdout.splitlines()[0] if r.stdout.strip() else ""
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", first))


def job_state(job_id: int) -> str:
    return job_info(job_id).get("JobState", "")


def array_states(array_job_id: int) -> dict[int, str]:
    """{task index: state} of an array job's tasks."""
    r = _run(["scontrol", "show", "job", "-o", str(array_job_id)], timeout=30)
    out = {}
    for line in r.stdout.splitlines():
        f = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
        if f.get("ArrayTaskId", "").isdigit():
            out[int(f["ArrayTaskId"])] = f.get("JobState", "")
    return out


def wait_job(job_id: int, timeout: float, until=TERMINAL) -> dict:
    """Poll `scontrol show job` until the job is in a state of `until`; returns its fields."""
    deadline = time.time() + timeout
    info: dict = {}
    while time.time() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in until:
            return info
        time.sleep(0.5)
    cancel(job_id)
    raise AssertionError(f"job {job_id} not in {sorted(until)} within {timeout:.0f}s: {info}")


def cancel(job_id: int) -> None:
    _run(["scancel", str(job_id)], timeout=30)


# ---------------------------------------------------------------------------------------- MPI


def ensure_mpi() -> None:
    """Open MPI's mpirun and mpi4py for this Python; raises Unavailable with the reason."""
    if shutil.which("mpirun") is None:
        _apt_install(["openmpi-bin", "libopenmpi-dev"], "the mpirun test")
    if shutil.which("mpirun") is None:
        raise Unavailable("openmpi-bin installed but mpirun is not on PATH")
    probe = [sys.executable, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"]
    if _run(probe, timeout=60).returncode != 0:
        r = _run([sys.executable, "-m", "pip", "install", "--quiet", "mpi4py"], timeout=600)
        if r.returncode != 0:
            raise Unavailable(f"pip install mpi4py failed: {(r.stderr or r.stdout).strip()[-600:]}")
        r = _run(probe, timeout=60)
        if r.returncode != 0:
            raise Unavailable(f"mpi4py does not load: {(r.stderr or r.stdout).strip()[-600:]}")

"""slurm/cpt.sh and slurm/prepare.sh against a real (one-node) Slurm cluster.

The cluster comes from tests/slurm_env.py: Debian's slurm-wlm + munge are installed and started
when absent (root only); otherwise these tests skip and say why. Each training job runs 2 tasks
(2 gloo ranks on CPU) of a tiny Llama through the real batch script with `--gpus-per-node=0`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import slurm_env
from conftest_data import hf_tokenizer_dir, make_docs  # noqa: F401  (fixture)
from helpers import REPO, cpu_env, read_metrics, tiny_hf_model, tiny_run_config, write_config

pytestmark = pytest.mark.slow

CPT = REPO / "slurm" / "cpt.sh"
PREPARE = REPO / "slurm" / "prepare.sh"
STEPS = 80  # long enough (with 8 micro-batches a step) that a signal after step 1 lands mid-run
JOB_TIMEOUT = 900  # s; a 2-core machine shared with other work can be slow to start DeepSpeed


@pytest.fixture(scope="module")
def cluster():
    try:
        return slurm_env.ensure_slurm()
    except slurm_env.Unavailable as e:
        pytest.skip(f"no Slurm cluster: {e}")


def job_env(**extra) -> dict:
    env = cpu_env(MEGACPT_PYTHON=sys.executable, PYTHONPATH=str(REPO), **extra)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    for k in list(env):  # a test run inside some other Slurm job must not leak its job's variables
        if k.startswith(("SLURM_", "SBATCH_", "SRUN_")):
            del env[k]
    return env


CPU_JOB = ["--gpus-per-node=0", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=30"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, cluster):
    tmp = tmp_path_factory.mktemp("slurm")
    model = tiny_hf_model(tmp / "model")

    def config(name: str) -> Path:
        cfg = tiny_run_config(tmp, model, tmp / name, steps=STEPS, zero=1, gb=16, mb=1)
        cfg["train"]["eval_interval"] = 1000
        cfg["train"]["eval_at_start"] = False
        cfg["checkpoint"]["interval"] = 1000  # only the final (or the signalled) step saves
        return write_config(tmp / f"{name}.yaml", cfg)

    return {"tmp": tmp, "config": config}


def submit_cpt(tiny, name: str, preflight: bool = False) -> int:
    cfg = tiny["config"](name)
    pre = ["--preflight"] if preflight else []
    return slurm_env.sbatch([*CPU_JOB, f"--job-name={name}", f"--chdir={tiny['tmp']}", str(CPT), *pre, str(cfg),
                             "--set", "train.log_interval=1"], job_env(), tiny["tmp"])


def train_records(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def job_log(run_dir, name, job_id) -> str:
    return (Path(run_dir) / "logs" / f"{name}-{job_id}.out").read_text()


def _explain(tiny, run_dir, name, job_id) -> str:
    out = []
    for f in [Path(run_dir) / "logs" / f"{name}-{job_id}.out", Path(tiny["tmp"]) / f"{name}-{job_id}.out"]:
        if f.exists():
            out.append(f"--- {f}\n" + "\n".join(f.read_text().splitlines()[-40:]))
    return "\n".join(out)


@pytest.fixture(scope="module")
def reference_job(tiny):
    """An uninterrupted 2-task job (preflight first): the reference for the preempted one."""
    name = "plain"
    job = submit_cpt(tiny, name, preflight=True)
    info = slurm_env.wait_job(job, JOB_TIMEOUT)
    run_dir = tiny["tmp"] / name
    assert info["JobState"] == "COMPLETED", f"{info}\n{_explain(tiny, run_dir, name, job)}"
    return {"job": job, "info": info, "run_dir": run_dir, "name": name}


def test_cpt_job_completes(tiny, reference_job):
    run_dir, job, info = reference_job["run_dir"], reference_job["job"], reference_job["info"]
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    recs = train_records(run_dir)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    from megacpt.train import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None and ckpt.read_state(latest)["step"] == STEPS
    resolved = json.loads((run_dir / "config.resolved.json").read_text())
    assert resolved["world_size"] == 2  # two srun tasks became two ranks
    log = job_log(run_dir, "plain", job)
    assert re.search(r"nodes 1 \(\S+\), tasks 2 \(per node 2\), cpus/task 1, gpus/node 0", log), log
    assert re.search(r"master \S+:\d+", log) and "train step exited with 0" in log
    assert "preflight OK: 2 ranks on 1 host(s), all-reduce correct" in log and "preflight step exited with 0" in log
    # The Slurm --output file (in the submit dir) points at the log in the run directory.
    slurm_out = (tiny["tmp"] / f"plain-{job}.out").read_text()
    assert f"log: {run_dir.resolve()}/logs/plain-{job}.out" in slurm_out


def test_usr1_checkpoints_requeues_and_resumes(tiny, reference_job):
    name = "preempted"
    run_dir = tiny["tmp"] / name
    job = submit_cpt(tiny, name)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + JOB_TIMEOUT
    while time.time() < deadline:  # wait until training is under way (the trainer's handler is set)
        if metrics.exists() and any(r.get("step", 0) >= 1 and "loss" in r for r in read_metrics(run_dir)):
            break
        assert slurm_env.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), _explain(tiny, run_dir, name, job)
        time.sleep(0.2)
    else:
        slurm_env.cancel(job)
        pytest.fail(f"job {job} never logged step 1\n{_explain(tiny, run_dir, name, job)}")
    r = subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = slurm_env.wait_job(job, JOB_TIMEOUT, until=slurm_env.TERMINAL)
    log = job_log(run_dir, name, job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{_explain(tiny, run_dir, name, job)}"
    assert int(info["Restarts"]) == 1, info

    m = re.search(r"stopped at step (\d+)/(\d+) \(SIGUSR1\); checkpoint written", log)
    assert m, log
    stopped = int(m.group(1))
    assert 1 <= stopped < STEPS and int(m.group(2)) == STEPS, "the signal must land mid-run"
    assert f"requeueing job {job}; it resumes from step {stopped}" in log
    assert re.search(rf"resuming from \S+step_{stopped:08d} at step {stopped}", log), log
    assert "(restart 1)" in log

    # Nothing lost, nothing seen twice: every step exactly once, each consuming the same samples
    # as the uninterrupted job's, and (same world size, bit-exact resume) the same losses.
    got, ref = train_records(run_dir), train_records(reference_job["run_dir"])
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["samples_fingerprint"] for r in got] == [r["samples_fingerprint"] for r in ref]
    assert [r["consumed_samples"] for r in got] == [r["consumed_samples"] for r in ref]
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    assert len({r["samples_fingerprint"] for r in ref}) == STEPS  # the fingerprints do tell steps apart


def test_prepare_array_and_merge_match_unsplit(tmp_path, cluster, hf_tokenizer_dir):  # noqa: F811
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for doc in make_docs(90, seed=5):
            f.write(json.dumps({"text": doc}) + "\n")
    common = ["--input", str(corpus), "--tokenizer", hf_tokenizer_dir, "--valid-fraction", "0.2", "--workers", "1"]
    env = job_env()
    r = subprocess.run([sys.executable, "-m", "megacpt.cli", "prepare", *common, "--output", str(tmp_path / "ref" / "de")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr

    out = tmp_path / "split" / "de"
    r = subprocess.run(["bash", str(PREPARE), "--submit", "3", "--cpus-per-task=1", "--time=10", f"--chdir={tmp_path}",
                        "--", *common, "--output", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    array_id, merge_id = map(int, r.stdout.split()[-2:])
    info = slurm_env.wait_job(merge_id, JOB_TIMEOUT)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(tmp_path.glob("*.out")))
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs}"
    tasks = slurm_env.array_states(array_id)
    assert sorted(tasks) == [0, 1, 2] and set(tasks.values()) == {"COMPLETED"}, tasks
    assert "part 1 of 3" in logs and "merging 3 parts" in logs
    for suffix in ("", "_valid"):
        for ext in (".bin", ".idx"):
            a = (tmp_path / "ref" / f"de{suffix}{ext}").read_bytes()
            b = Path(f"{out}{suffix}{ext}").read_bytes()
            assert len(a) > 0 and a == b, f"de{suffix}{ext} differs"
    assert not Path(f"{out}.parts").exists()  # parts are removed after a successful merge


def test_bad_config_fails_before_any_rank_starts(tiny):
    cfg = tiny["config"]("badcfg")
    job = slurm_env.sbatch([*CPU_JOB, "--job-name=badcfg", f"--chdir={tiny['tmp']}", str(CPT), str(cfg),
                            "--set", "train.no_such_key=1"], job_env(), tiny["tmp"])
    info = slurm_env.wait_job(job, JOB_TIMEOUT)
    out = (tiny["tmp"] / f"badcfg-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert "no_such_key" in out and "nothing was started" in out, out
    assert not (tiny["tmp"] / "badcfg").exists()


def test_job_shorter_than_the_stop_lead_is_refused_not_requeued(tiny):
    """--time=5 (300 s) is under the 600 s stop lead: one line and exit 2, instead of a USR1 at once
    and a requeue every minute (what an `#SBATCH --signal=B:USR1@600` did)."""
    cfg = tiny["config"]("short")
    job = slurm_env.sbatch([*CPU_JOB[:-1], "--time=5", "--job-name=short", f"--chdir={tiny['tmp']}", str(CPT),
                            str(cfg)], job_env(), tiny["tmp"])
    info = slurm_env.wait_job(job, JOB_TIMEOUT)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert info.get("Restarts", "0") == "0", info
    out = (tiny["tmp"] / "short" / "logs" / f"short-{job}.out").read_text()
    errors = [ln for ln in out.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "at or under the 600s stop lead" in errors[0] and "longer --time" in errors[0], out
    assert not (tiny["tmp"] / "short" / "checkpoints").exists()

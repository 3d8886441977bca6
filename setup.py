from setuptools import find_packages, setup

packages = find_packages(include=["megacpt", "megacpt.*"])
setup(
    name="megacpt",
    version="0.1.0",
    description="Continued pre-training of Hugging Face decoder LMs with DeepSpeed ZeRO, TP and PP",
    python_requires=">=3.10",
    packages=packages + ["megacpt.kernels"],
    # Triton kernels live at the top level (kernels/) but import as megacpt.kernels.
    package_dir={"megacpt.kernels": "kernels"},
    # Lower bounds: requirements.txt's pins (what the suite runs); upper: the next major (0.x: minor).
    # scripts/newest_deps.sh (.ci/run) tests the newest transformers/deepspeed allowed; torch only at its pin.
    install_requires=[
        "torch>=2.13,<3",
        "deepspeed>=0.19.8,<0.20",
        "transformers>=5.23,<6",
        "safetensors",
        "numpy",
        "pyyaml",
        "tqdm",
    ],
    # eval: `megacpt eval --tasks` and eval.tasks (lm-evaluation-harness), imported only when used.
    # fp8: `precision: fp8` (torchao's float8 training; megacpt/train/float8.py names the version).
    extras_require={"triton": ["triton"], "eval": ["lm-eval>=0.4.13"], "fp8": ["torchao>=0.18.0,<0.19"]},
    entry_points={"console_scripts": ["megacpt=megacpt.cli:main"]},
)

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
    install_requires=[
        "torch>=2.5",
        "deepspeed>=0.16",
        "transformers>=4.45",
        "safetensors",
        "numpy",
        "pyyaml",
        "tqdm",
    ],
    # eval: `megacpt eval --tasks` and eval.tasks (lm-evaluation-harness), imported only when used.
    extras_require={"triton": ["triton"], "eval": ["lm-eval>=0.4.13"]},
    entry_points={"console_scripts": ["megacpt=megacpt.cli:main"]},
)

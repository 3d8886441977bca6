"""How much to retrain, measured (docs/RETRAIN.md): linear probe, LoRA r=8, the lower half frozen
and full fine-tuning of a sequence classifier (task: classify) on Debian package descriptions
labelled with their section (configs/data/debian_sections, scripts/debian_sections.py), at two
training-set sizes, on the real SmolLM2-135M-Instruct and Gemma 3 270M base. One process per run
(ZeRO-0, fp32, CPU), each a plain `megacpt train` of a generated config, then `megacpt eval` of
the run on the original domain (English manual pages never trained on) for the forgetting.

    bash scripts/demo_data.sh && bash scripts/setup.sh gemma3 && bash scripts/demo_data.sh gemma3-270m
    python scripts/retrain_experiment.py [--models smollm2,gemma3] [--json OUT] [--plot PNG]

Prints a Markdown table; the JSON holds every figure plus wall and CPU seconds per run. Runs that
already finished (their result file exists) are read back, not repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs" / "data" / "debian_sections"
WORK = ROOT / "work" / "runs" / "retrain"
MODELS = {  # model dir, its shard of the original-domain text, decoder layers
    "smollm2": (ROOT / "work/models/smollm2-135m", ROOT / "work/data/en_heldout_valid", 30),
    "gemma3": (ROOT / "work/models/gemma3-270m", ROOT / "work/data/gemma3/en_heldout_valid", 18),
}
SIZES = {"small": ("train_small.jsonl", 12), "large": ("train_large.jsonl", 24)}  # file, steps of 16
METHODS = ["probe", "lora", "lower_half", "full"]
SEQ_LEN, BATCH, EVAL_TOKENS = 24, 16, 4096


def method_config(method: str, layers: int) -> dict:
    """What each method trains, and its learning rate (a fresh linear head wants a larger one)."""
    if method == "probe":
        return {"train": {"freeze": ["backbone"]}, "optim": {"lr": 3e-3}}
    if method == "lora":
        return {"adapter": {"kind": "lora", "r": 8, "alpha": 16}, "optim": {"lr": 1e-3}}
    if method == "lower_half":
        return {"train": {"freeze": ["model.embed_tokens.weight", f"layers.0-{layers // 2 - 1}"]}, "optim": {"lr": 1e-4}}
    return {"optim": {"lr": 1e-4}}


def run_config(model: str, method: str, size: str, run_dir: Path) -> dict:
    model_dir, _, layers = MODELS[model]
    train_file, steps = SIZES[size]
    cfg = {
        "run_dir": str(run_dir), "seed": 1, "task": "classify", "model": {"init_from": str(model_dir)},
        "data": {"seq_len": SEQ_LEN, "train": [{"name": "train", "path": str(DATA / train_file)}],
                 "valid": [{"name": "held", "path": str(DATA / "valid.jsonl")}]},
        "classify": {"gap_examples": 48},
        "train": {"steps": steps, "micro_batch_size": BATCH, "global_batch_size": BATCH,
                  "eval_interval": steps, "log_interval": 1, "eval_at_start": False},
        "optim": {"weight_decay": 0.0, "grad_clip": 1.0},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "parallel": {"zero_stage": 0}, "precision": "fp32",
        "checkpoint": {"interval": steps, "keep": 1}, "tensorboard": False,
    }
    extra = method_config(method, layers)
    cfg["train"].update(extra.get("train", {}))
    cfg["optim"].update(extra["optim"])
    if "adapter" in extra:
        cfg["adapter"] = extra["adapter"]
    cfg["optim"]["min_lr"] = cfg["optim"]["lr"] / 10
    return cfg


def timed(cmd: list[str], log: Path) -> dict:
    """Run one command; its wall time and the CPU seconds its process tree used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc:
        sys.exit(f"{' '.join(cmd)} failed with exit {rc}; see {log}")
    return {"wall_s": time.perf_counter() - t0,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def eval_original(model_path: Path, shard: Path, out: Path, log: Path) -> tuple[float, dict]:
    if out.exists() and model_path.is_dir() and not (model_path / "metrics.jsonl").exists():  # a base model, measured
        return json.loads(out.read_text())["original"]["ppl"], {"wall_s": 0.0, "cpu_s": 0.0}
    cost = timed([sys.executable, "-m", "megacpt", "eval", "--model", str(model_path), "--data",
                  f"original={shard}", "--seq-len", "256", "--max-tokens", str(EVAL_TOKENS), "--json", str(out)], log)
    return json.loads(out.read_text())["original"]["ppl"], cost


def read_run(run_dir: Path) -> dict:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    state = next(r for r in recs if r.get("event") == "model_state")
    last = [r for r in recs if "valid/held/accuracy" in r][-1]
    return {"trainable_params": state["trainable_params"], "frozen_params": state["frozen_params"],
            "optimizer_state_mb": state["optimizer_state_mb"], "steps": last["step"],
            "accuracy": last["valid/held/accuracy"],
            "macro_f1": last["valid/held/macro_f1"], "held_loss": last["valid/held/loss"],
            "train_sample_loss": last["train_sample/loss"], "gap": last["valid/held/gap"]}


def one_run(model: str, method: str, size: str, base_ppl: float) -> dict:
    run_dir = WORK / f"{model}_{size}_{method}"
    result = run_dir / "result.json"
    if result.exists():
        return json.loads(result.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cfg_path = run_dir.with_suffix(".yaml")
    cfg_path.write_text(yaml.safe_dump(run_config(model, method, size, run_dir), sort_keys=False))
    log = run_dir.with_suffix(".log")
    log.unlink(missing_ok=True)
    print(f"{model} {size} {method} ...", flush=True)
    train_cost = timed([sys.executable, "-m", "megacpt.train", str(cfg_path)], log)
    ppl, eval_cost = eval_original(run_dir, MODELS[model][1], run_dir / "original.json", log)
    out = {"model": model, "size": size, "method": method, **read_run(run_dir),
           "original_ppl": ppl, "original_ppl_base": base_ppl, "original_ppl_change": ppl / base_ppl - 1,
           "train_wall_s": train_cost["wall_s"], "train_cpu_s": train_cost["cpu_s"],
           "eval_wall_s": eval_cost["wall_s"], "eval_cpu_s": eval_cost["cpu_s"]}
    shutil.rmtree(run_dir / "checkpoints")  # up to 3 GB each; the figures are in result.json
    result.write_text(json.dumps(out, indent=1))
    return out


def markdown(rows: list[dict]) -> str:
    head = ("| model | train set | method | trainable params | optimizer state / rank | held-out acc | macro-F1 "
            "| gap (held − train loss) | original-domain ppl change | CPU s |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        n = len(json.loads((DATA / "PROVENANCE.json").read_text())["sections"]) * (8 if r["size"] == "small" else 64)
        lines.append(f"| {r['model']} | {n} | {r['method']} | {r['trainable_params']:,} | {r['optimizer_state_mb']:.1f} MiB "
                     f"| {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['gap']:+.3f} | {100 * r['original_ppl_change']:+.2f} % "
                     f"| {r['train_cpu_s'] + r['eval_cpu_s']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows}, key=list(MODELS).index)
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7.5), squeeze=False)
    colors = dict(zip(METHODS, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for col, model in enumerate(models):
        for r in (r for r in rows if r["model"] == model):
            style = {"color": colors[r["method"]], "s": 70, "marker": "o" if r["size"] == "large" else "^"}
            axes[0][col].scatter(r["trainable_params"], r["accuracy"], **style)
            axes[1][col].scatter(r["trainable_params"], 100 * r["original_ppl_change"], **style)
        chance = 1 / len(json.loads((DATA / "PROVENANCE.json").read_text())["sections"])
        axes[0][col].axhline(chance, color="grey", ls=":", lw=1)
        axes[0][col].set_title(f"{model}: held-out accuracy (dotted: chance)")
        axes[1][col].set_title(f"{model}: original-domain perplexity change")
        axes[1][col].set_ylabel("%")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log")
            ax.set_xlabel("trainable parameters")
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="s", ls="", label=m) for m, c in colors.items()]
    handles += [plt.Line2D([], [], color="k", marker=mk, ls="", label=f"{s} train set")
                for s, mk in (("small", "^"), ("large", "o"))]
    fig.legend(handles=handles, loc="lower center", ncol=6)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def wanted(sizes: str, model: str, size: str) -> bool:
    """--sizes small,large (every model) or per model: smollm2:small,smollm2:large,gemma3:small."""
    items = sizes.split(",")
    return size in items or f"{model}:{size}" in items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2,gemma3")
    p.add_argument("--sizes", default="small,large", help="per model, e.g. gemma3:small to run only that size")
    p.add_argument("--report-only", action="store_true", help="table, JSON and plot of the finished runs; run nothing")
    p.add_argument("--json", default=str(ROOT / "bench/results/retrain-experiment-cpu.json"))
    p.add_argument("--plot", default=str(ROOT / "docs/img/retrain_experiment.png"))
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread: CPU seconds without spinning
    os.environ.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    WORK.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for model in a.models.split(","):
        if a.report_only:
            done = (WORK / f"{model}_{s}_{m}" / "result.json" for s in SIZES for m in METHODS)
            rows += [json.loads(f.read_text()) for f in done if f.exists()]
            continue
        model_dir, shard, _ = MODELS[model]
        base_ppl, _ = eval_original(model_dir, shard, WORK / f"{model}_base_original.json", WORK / f"{model}_base.log")
        rows += [one_run(model, m, s, base_ppl) for s in SIZES for m in METHODS if wanted(a.sizes, model, s)]
    table = markdown(rows)
    print(table)
    cpu = sum(r["train_cpu_s"] + r["eval_cpu_s"] for r in rows)
    Path(a.json).write_text(json.dumps({"runs": rows, "total_cpu_s": cpu, "wall_s": time.perf_counter() - t0,
                                        "command": "python scripts/retrain_experiment.py " + " ".join(argv or sys.argv[1:]),
                                        "threads": os.environ["OMP_NUM_THREADS"], "seq_len": SEQ_LEN,
                                        "batch": BATCH, "steps": {k: v[1] for k, v in SIZES.items()},
                                        "data": json.loads((DATA / "PROVENANCE.json").read_text())}, indent=1))
    plot(rows, Path(a.plot))
    print(f"total CPU: {cpu / 60:.1f} min; {a.json}, {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Context parallelism by hand (not in the suite: 4 ranks): CP=2 × DP=2 under ZeRO-3 against one
process with ZeRO-0, through the real trainer, with and without document masking.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cp_equality.py --json bench/results/cp-equality-4ranks-cpu-DATE.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/cp_equality.py --tp 2 --json ...   # CP=2 × TP=2 instead (DP=1)

Tiny Llama-style model (4 heads, 2 KV heads) from tests/helpers.py, fp32, 5 steps, global batch 4 of
seq_len 32. Prints and writes the largest absolute and relative differences of the per-step loss
and clipped grad norm and of the validation losses (steps 0 and 5).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import read_metrics, run_ok, tiny_hf_model, tiny_run_config, write_config  # noqa: E402


def _series(run_dir: Path) -> dict:
    out = {}
    for r in read_metrics(run_dir):
        if "loss" in r and "event" not in r:
            out[f"step {r['step']} loss"] = r["loss"]
            out[f"step {r['step']} grad_norm"] = r["grad_norm"]
        for k, v in r.items():
            if k.startswith("valid/") and k.endswith("/loss"):
                out[f"step {r['step']} {k}"] = v
    return out


def _compare(a: dict, b: dict) -> dict:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    abs_d = {k: abs(a[k] - b[k]) for k in a}
    rel_d = {k: abs_d[k] / max(abs(a[k]), 1e-30) for k in a}
    return {"values": len(a), "max_abs_diff": max(abs_d.values()), "max_rel_diff": max(rel_d.values()),
            "worst": max(rel_d, key=rel_d.get)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--tp", type=int, default=1, choices=[1, 2], help="2: the 4 ranks are CP=2 × TP=2 (DP=1)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cp_equality_"))
    model = tiny_hf_model(tmp / "model", max_pos=256)
    multi = "cp2_tp2_zero3" if a.tp == 2 else "cp2_dp2_zero3"
    result = {"layout": multi, "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/cp_equality.py " + " ".join(sys.argv[1:]),
              "seq_len": a.seq_len, "steps": 5, "global_batch": 4, "runs": {}}
    for doc in (False, True):
        runs = {}
        for name, nproc, zero, cp, tp in (("single_zero0", 1, 0, 1, 1), (multi, 4, 3, 2, a.tp)):
            run = tmp / f"{name}_doc{int(doc)}"
            c = tiny_run_config(tmp, model, run, steps=5, zero=zero, gb=4, mb=1, seq=a.seq_len,
                                **{"parallel.cp": cp, "parallel.tp": tp, "data.document_mask": doc,
                                   "train.eval_at_start": True,
                                   # ZeRO-3 partitions even these tiny parameters (none kept whole).
                                   "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}})
            t = time.time()
            run_ok(nproc, write_config(tmp / f"{run.name}.yaml", c))
            runs[name] = (run, time.time() - t)
        cmp = _compare(_series(runs["single_zero0"][0]), _series(runs[multi][0]))
        layout = json.loads((runs[multi][0] / "layout.json").read_text())
        cmp["ranks"] = layout["ranks"]
        cmp["q_proj_per_rank"] = layout["params"]["layers.0.self_attn.q_proj.weight"]
        cmp["seconds"] = {n: round(t, 1) for n, (_, t) in runs.items()}
        result["runs"]["document_mask" if doc else "no_document_mask"] = cmp
        print(f"document_mask={doc}: {cmp}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Activation memory per rank against sequence length, without and with context parallelism.

    OMP_NUM_THREADS=1 timeout 300 .venv/bin/python bench/cp_activations.py --seq-lens 512,1024,2048,4096 \
        --json bench/results/cp-activations-cpu-DATE.json

For each cp in --cps and each length, `cp` ranks (gloo, one process each, spawned per cp) build
the model the way the trainer does (megacpt.train.parallelize: build_model with the layout's
Topology, context_parallel) and run one training forward of one sequence (micro-batch 1), each
rank on its seq_len/cp positions, then the backward. Measured per rank: the bytes autograd keeps
for the backward (torch.autograd.graph.saved_tensors_hooks: every saved tensor's storage, each
storage once, parameters excluded): the activation memory of a step without activation
checkpointing. With --document-mask the (b, 1, s, s) boolean mask SDPA keeps is included: it
covers the whole sequence on every rank (Ulysses splits heads, not the mask).
Random weights (no files needed); fp32; the model is a shape from megacpt/bench/shapes.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megacpt.bench.shapes import SHAPES
from megacpt.models.hf import args_from_hf_config
from megacpt.parallel import Topology
from megacpt.train.parallelize import BuildSpec, build_model, context_parallel


class SavedBytes:
    """Storages autograd saves for the backward, each counted once; parameters excluded."""

    def __init__(self, model):
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.skip:
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def measure(args, topo, seq_len: int, document_mask: bool) -> dict:
    model = build_model(BuildSpec(args, dtype=torch.float32, zero_stage=0, seed=0), topo)
    model.train()
    cp = context_parallel(args, topo)
    g = torch.Generator().manual_seed(seq_len)
    ids = torch.randint(0, args.vocab_size, (1, seq_len + 1), generator=g)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    kwargs = {}
    if document_mask:  # documents of 64-192 tokens
        starts = torch.zeros(1, seq_len, dtype=torch.long)
        starts[0, torch.randint(64, 192, (seq_len // 64,), generator=g).cumsum(0)[:-1].clamp(max=seq_len - 1)] = 1
        kwargs["segment_ids"] = starts.cumsum(1)
    if cp is not None:
        inputs, labels, kwargs["cp"] = cp.shard(inputs), cp.shard(labels), cp
    saved = SavedBytes(model)
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        loss = model(inputs, labels, **kwargs)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return {"saved_bytes": saved.total, "saved_storages": len(saved.storages), "tokens_on_rank": inputs.shape[1],
            "forward_s": round(t1 - t0, 3), "backward_s": round(t2 - t1, 3)}


def rank_main(rank: int, world: int, store_path: str, spec: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    args = args_from_hf_config(spec["shape"])
    topo = Topology(world, rank, cp=world)
    rows = [dict(seq_len=s, **measure(args, topo, s, spec["document_mask"])) for s in spec["seq_lens"]]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))
    if world > 1:
        dist.destroy_process_group()


def run_cp(cp: int, spec: dict) -> list[dict]:
    """Rows for one cp: per length the largest per-rank figure and every rank's."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        if cp == 1:
            rank_main(0, 1, store, spec, tmp)
        else:
            mp.spawn(rank_main, args=(cp, store, spec, tmp), nprocs=cp, join=True)
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(cp)]
    rows = []
    for i, s in enumerate(spec["seq_lens"]):
        ranks = [pr[i] for pr in per_rank]
        rows.append({"cp": cp, "seq_len": s, "saved_bytes_per_rank_max": max(r["saved_bytes"] for r in ranks),
                     "ranks": ranks})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", choices=sorted(SHAPES), help="a shape of megacpt/bench/shapes.py")
    ap.add_argument("--seq-lens", default="512,1024,2048,4096")
    ap.add_argument("--cps", default="1,2")
    ap.add_argument("--document-mask", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    lens = [int(x) for x in a.seq_lens.split(",")]
    shape = dict(SHAPES[a.model], max_position_embeddings=max(lens))
    spec = {"shape": shape, "seq_lens": lens, "document_mask": a.document_mask}
    t0 = time.time()
    rows = [r for cp in (int(x) for x in a.cps.split(",")) for r in run_cp(cp, spec)]
    by = {(r["cp"], r["seq_len"]): r["saved_bytes_per_rank_max"] for r in rows}
    print(f"activation bytes per rank (saved for backward), model {a.model}, fp32, micro-batch 1, "
          f"document mask {a.document_mask}")
    cps = sorted({r["cp"] for r in rows})
    print(f"{'seq_len':>8} " + " ".join(f"{f'cp={c} MiB':>11}" for c in cps) + "   ratio to cp=1")
    for s in lens:
        vals = [by[(c, s)] for c in cps]
        print(f"{s:>8} " + " ".join(f"{v / 2**20:>11.2f}" for v in vals) + "   "
              + " ".join(f"{v / vals[0]:.3f}" for v in vals[1:]))
    if a.json:
        out = {"benchmark": "cp_activations", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/cp_activations.py " + " ".join(sys.argv[1:]),
               "host": platform.processor() or platform.machine(), "torch": torch.__version__,
               "model": a.model, "shape": shape, "dtype": "float32", "micro_batch": 1,
               "document_mask": a.document_mask, "measured": SavedBytes.__doc__, "rows": rows,
               "wall_s": round(time.time() - t0, 1)}
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`megacpt bench <what>`: benchmarks that print a table and write JSON (never timing asserts).

Parsers only; each target is a function in megacpt/bench/ (imported when its command runs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megacpt.cli.common import add_common

# megacpt/bench/loss.py's _DTYPES (sorted) and _IMPLS; tests/test_bench.py holds them equal.
LOSS_DTYPES = ["bf16", "fp16", "fp32"]
LOSS_IMPLS = ("ours", "ours-chunked-triton", "ours-torch", "eager", "torch-chunked", "liger")
# bench/bench_data.py keeps its own parser; `bench data` exists where the script does (a checkout).
DATA_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_data.py"


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (training throughput, ZeRO memory, loss kernel, data); "
                                     "print a table and write JSON")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT")
    bsub.required = True
    tp = bsub.add_parser("train", help="end-to-end training throughput (with --peers: against the HF peers, "
                                       "interleaved, same launcher and environment)",
                         description="Training throughput: tokens/s, TFLOP/s and MFU per device, step-time "
                                     "spread, peak memory per rank; with --peers side by side with transformers + "
                                     "DeepSpeed (plain loop) and the transformers Trainer.")
    add_train_args(tp)
    add_common(tp)
    tp.set_defaults(target="megacpt.bench.train:run_train_bench")

    mp = bsub.add_parser("memory", help="ZeRO-3 model-state memory per rank at several world sizes vs 16·params/world",
                         description="ZeRO-3 model-state bytes per rank (partitioned parameters, fp32 masters, "
                                     "gradient partitions, Adam moments) after one step, at each world size.")
    add_memory_args(mp)
    add_common(mp)
    mp.set_defaults(target="megacpt.bench.memory:run_memory_bench")

    lp = bsub.add_parser("loss", help="fused linear cross-entropy against eager, torch chunked and Liger")
    add_loss_args(lp)
    add_common(lp)
    lp.set_defaults(target="megacpt.bench.loss:run_loss_bench")

    cp = bsub.add_parser("contamination", help="megacpt contamination: peak memory as the training corpus grows, "
                                               "and 2 workers against 1",
                         description="Random uint16 token corpora of each size with planted eval items; each run "
                                     "a fresh process; peak RSS (ru_maxrss) of it and its workers, and wall time.")
    add_contamination_args(cp)
    add_common(cp)
    cp.set_defaults(target="megacpt.bench.contamination:run_contamination_bench")

    if DATA_SCRIPT.is_file():
        dp = bsub.add_parser("data", help="megacpt prepare against datasets.map + numpy, and peak memory "
                                          f"(runs {DATA_SCRIPT.relative_to(DATA_SCRIPT.parents[1])}; arguments pass "
                                          "through)",
                             add_help=False, prefix_chars="\x01")
        # Every argument (--help included) goes to the script's own parser.
        dp.add_argument("args", nargs="*", help="arguments of bench/bench_data.py (--help for its own)")
        dp.set_defaults(target="megacpt.bench.data:run_data_bench", script=str(DATA_SCRIPT))


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="HF_DIR_OR_SHAPE",
                   help="a Hugging Face model dir or a shape name (tiny, small, smollm2-135m, smollm2-360m, "
                        "qwen2-0.5b, llama3-1b, llama3-3b, llama3-8b), built with random weights once")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per rank per optimizer step")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="steps run first and excluded from the figures")
    p.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--nproc", type=int, default=None, help="local ranks (default: GPUs, or 2 on CPU)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32", "fp8"], default="auto",
                   help="auto: bf16 on CUDA, fp32 on CPU; fp8: megacpt's precision: fp8 (torchao float8 linears, "
                        "GPUs of compute capability ≥ 8.9), without peers")
    p.add_argument("--peers", nargs="?", const="a,b", default=None, metavar="a,b",
                   help="also run peer a (HF model + DeepSpeed loop) and peer b (HF Trainer), interleaved; "
                        "--peers a runs peer a only")
    p.add_argument("--repeats", type=int, default=1, help="rounds of (megacpt[, peer a, peer b])")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS/MKL_NUM_THREADS for every rank of every system "
                        "(default: usable cores ÷ ranks, at least 1)")
    p.add_argument("--env", dest="extra_env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for every rank of every system (e.g. GLIBC_TUNABLES=... to give "
                        "the peers the allocator settings megacpt makes itself); recorded in the JSON")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra megacpt config override (e.g. deepspeed.zero_optimization.offload_optimizer.device=cpu, "
                        "model.activation_checkpointing=true); DeepSpeed keys reach the peers too")
    p.add_argument("--json", metavar="OUT.json", default=None, help="write the results here")
    p.add_argument("--work-dir", default=None, help="keep runs, logs and data here (default: a temp dir, removed)")
    p.add_argument("--cache-dir", default=None, help="where shapes are built (default $MEGACPT_CACHE/shapes "
                                                     "or ~/.cache/megacpt/shapes)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is killed")


def add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="small", metavar="HF_DIR_OR_SHAPE",
                   help="HF dir or shape name (default: small, ~7M parameters)")
    p.add_argument("--world-sizes", default="1,2,4", help="comma-separated world sizes (default 1,2,4)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--precision", default="fp32", metavar="P[,P...]",
                   help="fp32, bf16, or both (fp32,bf16: every world size in each; default fp32)")
    p.add_argument("--persistence-threshold", type=int, default=0,
                   help="stage3_param_persistence_threshold (default 0: every parameter is partitioned; "
                        "DeepSpeed's own default 100000 keeps small ones whole on every rank)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    p.add_argument("--lora-r", default="0", metavar="R[,R...]",
                   help="also measure with a LoRA adapter of each rank R on the attention and MLP projections "
                        "(0: full fine-tuning; default 0); e.g. 0,8 compares the two")
    p.add_argument("--json", metavar="OUT.json", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--timeout", type=float, default=1200)


def add_loss_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", action="append", metavar="N,H,V",
                        help="tokens, hidden size, vocabulary (repeatable); default 4096,256,32768 "
                             "on CPU, 4096,2048,128256 and 8192,4096,128256 on CUDA")
    parser.add_argument("--dtype", choices=LOSS_DTYPES, default=None,
                        help="input dtype (default fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--impl", action="append", choices=LOSS_IMPLS,
                        help="implementations to run (repeatable; default: all available)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--ignore-fraction", type=float, default=0.0,
                        help="fraction of targets set to ignore_index (e.g. padding)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT.json", default=None, help="write the results here")


def add_contamination_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="20e6,200e6", help="training corpus sizes in tokens (default 20e6,200e6)")
    p.add_argument("--workers", type=int, default=2, help="worker count compared against 1 at the largest size")
    p.add_argument("--repeats", type=int, default=1, help="alternating (1 worker, --workers) runs at the largest size")
    p.add_argument("--items", type=int, default=2000, help="eval items (default 2000)")
    p.add_argument("--item-len", type=int, default=200, help="tokens per eval item (default 200)")
    p.add_argument("--ngram", type=int, default=13)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="keep the corpora here (default: a temp dir, removed)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run before it is killed")
    p.add_argument("--json", metavar="OUT.json", default=None, help="write the results here")

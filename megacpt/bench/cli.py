"""`megacpt bench <what>`: benchmarks that print a table and write JSON (never timing asserts)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    from megacpt.cli import add_common

    p = sub.add_parser("bench", help="benchmarks (training throughput, ZeRO memory, loss kernel, data); "
                                     "print a table and write JSON")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT")
    bsub.required = True
    from megacpt.bench import loss

    tp = bsub.add_parser("train", help="end-to-end training throughput (with --peers: against the HF peers, "
                                       "interleaved, same launcher and environment)",
                         description="Training throughput: tokens/s, TFLOP/s and MFU per device, step-time "
                                     "spread, peak memory per rank; with --peers side by side with transformers + "
                                     "DeepSpeed (plain loop) and the transformers Trainer.")
    from megacpt.bench import train as train_bench

    train_bench.add_train_args(tp)
    add_common(tp)
    tp.set_defaults(func=_run_train)

    mp = bsub.add_parser("memory", help="ZeRO-3 model-state memory per rank at several world sizes vs 16·params/world",
                         description="ZeRO-3 model-state bytes per rank (partitioned parameters, fp32 masters, "
                                     "gradient partitions, Adam moments) after one step, at each world size.")
    from megacpt.bench import memory

    memory.add_memory_args(mp)
    add_common(mp)
    mp.set_defaults(func=_run_memory)

    lp = bsub.add_parser("loss", help="fused linear cross-entropy against eager, torch chunked and Liger")
    loss.add_loss_args(lp)
    add_common(lp)
    lp.set_defaults(func=loss.run_loss_bench)

    script = _data_script()
    if script is not None:
        dp = bsub.add_parser("data", help="megacpt prepare against datasets.map + numpy, and peak memory "
                                          f"(runs {script.relative_to(script.parents[1])}; arguments pass through)",
                             add_help=False, prefix_chars="\x01")
        # Every argument (--help included) goes to the script's own parser.
        dp.add_argument("args", nargs="*", help="arguments of bench/bench_data.py (--help for its own)")
        dp.set_defaults(func=_run_data)


def _run_train(args) -> int:
    from megacpt.bench.train import run_train_bench

    return run_train_bench(args)


def _run_memory(args) -> int:
    from megacpt.bench.memory import run_memory_bench

    return run_memory_bench(args)


def _data_script() -> Path | None:
    path = Path(__file__).resolve().parents[2] / "bench" / "bench_data.py"
    return path if path.is_file() else None


def _run_data(args) -> int:
    """Run bench/bench_data.py's main() with the arguments as given (it keeps its own parser)."""
    import importlib.util

    script = _data_script()
    spec = importlib.util.spec_from_file_location("megacpt_bench_data", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return int(mod.main([a for a in args.args if a != "--debug"]) or 0)

"""`megacpt bench data`: runs bench/bench_data.py (a script of the checkout with its own parser)."""

from __future__ import annotations

import importlib.util


def run_data_bench(args) -> int:
    """Run the script's main() with the arguments as given (`args.script`: its path)."""
    spec = importlib.util.spec_from_file_location("megacpt_bench_data", args.script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return int(mod.main([a for a in args.args if a != "--debug"]) or 0)

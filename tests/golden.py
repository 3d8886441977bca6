"""Golden per-step numbers of a few training layouts, recorded before the restructure of issue 18
and compared inside launches the suite already makes.

Recorded with MEGACPT_RECORD_GOLDEN=1 (writes tests/golden/NAME.json instead of comparing).
MEGACPT_GOLDEN_EXACT=1 compares bit for bit (same machine); the default tolerance (rtol 1e-6) lets
another CPU model pass, where BLAS may sum in another order.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from helpers import read_metrics

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
KEYS = ("loss", "grad_norm", "lr")


def _numbers(run_dir) -> dict:
    out = {}
    for r in read_metrics(run_dir):
        if "loss" in r and "event" not in r:
            out[str(r["step"])] = {**{k: r[k] for k in KEYS}, "samples_fingerprint": r["samples_fingerprint"]}
        for k, v in r.items():
            if k.startswith("valid/") and k.endswith("/loss"):
                out.setdefault(f"valid@{r['step']}", {})[k] = v
    return out


def check_golden(name: str, run_dir) -> None:
    got = _numbers(run_dir)
    path = GOLDEN_DIR / f"{name}.json"
    if os.environ.get("MEGACPT_RECORD_GOLDEN"):
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        return
    want = json.loads(path.read_text())
    assert sorted(got) == sorted(want), (name, sorted(got), sorted(want))
    exact = bool(os.environ.get("MEGACPT_GOLDEN_EXACT"))
    for step, ref in want.items():
        for k, v in ref.items():
            g = got[step][k]
            if k == "samples_fingerprint" or exact:
                assert g == v, (name, step, k, g, v)
            elif v is None:
                assert g is None, (name, step, k, g)
            else:
                assert math.isclose(g, v, rel_tol=1e-6, abs_tol=1e-12), (name, step, k, g, v)

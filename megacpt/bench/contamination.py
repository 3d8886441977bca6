"""`megacpt bench contamination`: memory and speed of `megacpt contamination` (hashed mode) as the
training corpus grows, and with 2 worker processes against 1.

It writes random uint16 token corpora of the given sizes (vocabulary 32,000, documents of 4,096
tokens) with PLANTED eval items copied in, and an eval shard of --items random items. Each run is
a fresh process (`python -m megacpt.bench.contamination child SPEC.json`) that imports only
megacpt.eval.contamination and reports:

  seconds           wall time of `check()` (the eval index, the scan and the report)
  cpu_s             user + system CPU time of the process and its workers (start-up included):
                    unlike wall time it does not grow when other processes share the cores
  load_average_after  the 1-minute load average when the run ended (other work on the machine)
  rss_before_kb     its VmRSS just before `check()` (interpreter, numpy, the module)
  maxrss_self_kb    ru_maxrss of the process (RUSAGE_SELF) at the end: its peak resident set
  maxrss_worker_kb  ru_maxrss of RUSAGE_CHILDREN: the largest peak of its worker processes (0
                    with 1 worker, which scans in the process itself)

Training shards are read with positioned reads, so the page cache holding them is not part of
any process's resident set. The runs at the largest size alternate 1 and 2 workers --repeats times.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from megacpt.bench.host import cpu_model
from megacpt.data.indexed import IndexedDatasetWriter
from megacpt.errors import UserError
from megacpt.eval.contamination import check

VOCAB = 32_000
DOC_TOKENS = 4096
PLANTED = 10
_WRITE_CHUNK = 1 << 23


def _write_corpus(prefix: Path, tokens: int, planted: list, seed: int) -> None:
    """`tokens` random tokens in documents of DOC_TOKENS, the planted items spread evenly among them."""
    rng = np.random.default_rng(seed)
    every = max(1, tokens // (len(planted) + 1))
    next_plant, k, written = every, 0, 0
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        while written < tokens:
            size = min(_WRITE_CHUNK, tokens - written)
            sizes = [DOC_TOKENS] * (size // DOC_TOKENS) + ([size % DOC_TOKENS] if size % DOC_TOKENS else [])
            w.add_documents(rng.integers(0, VOCAB, size, dtype=np.uint16), sizes)
            written += size
            while k < len(planted) and written >= next_plant:
                w.add_document(planted[k])
                k, next_plant = k + 1, next_plant + every


def _child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    rss_before = _vm_rss_kb()
    t0 = time.perf_counter()
    report = check({"train": spec["train"]}, {"eval": spec["eval"]}, ngram=spec["ngram"], workers=spec["workers"])
    seconds = time.perf_counter() - t0
    ev = report["eval"]["eval"]
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {
        "seconds": seconds,
        "cpu_s": own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime,
        "load_average_after": os.getloadavg()[0],
        "rss_before_kb": rss_before,
        "maxrss_self_kb": own.ru_maxrss,
        "maxrss_worker_kb": kids.ru_maxrss,
        "scanned_ngrams": report["scanned_ngrams"],
        "eval_ngrams": report["eval_ngrams"],
        "contaminated_items": ev["any"]["items"],
        "expected_false_items": ev["expected_false_items"],
    }
    Path(spec["out"]).write_text(json.dumps(out))
    return 0


def _vm_rss_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _run_child(work: Path, name: str, spec: dict, timeout: float) -> dict:
    spec_path, out = work / f"{name}.json", work / f"{name}.out.json"
    spec_path.write_text(json.dumps({**spec, "out": str(out)}))
    cmd = [sys.executable, "-m", "megacpt.bench.contamination", "child", str(spec_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"contamination bench run {name} failed (exit {proc.returncode}): {tail}")
    return json.loads(out.read_text())


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--sizes {text!r}: expected comma-separated token counts like 20e6,200e6") from None
    if not sizes or min(sizes) < 10 * DOC_TOKENS:
        raise UserError(f"--sizes {text!r}: give token counts of at least {10 * DOC_TOKENS}")
    return sizes


def _prepare(work: Path, a, sizes: list[int]) -> dict:
    rng = np.random.default_rng(a.seed)
    items = [rng.integers(0, VOCAB, a.item_len, dtype=np.uint16) for _ in range(a.items)]
    with IndexedDatasetWriter(work / "eval", np.uint16) as w:
        for it in items:
            w.add_document(it)
    planted = [items[i] for i in np.linspace(0, a.items - 1, min(PLANTED, a.items)).astype(int)]
    corpora = {}
    for size in sizes:
        t0 = time.perf_counter()
        _write_corpus(work / f"train{size}", size, planted, a.seed + 1)
        corpora[size] = str(work / f"train{size}")
        print(f"wrote {size:,} training tokens in {time.perf_counter() - t0:.1f} s", flush=True)
    return {"eval": str(work / "eval"), "corpora": corpora, "planted": len(planted)}


def _runs(work: Path, a, data: dict, sizes: list[int]) -> list[dict]:
    plan = [(s, 1) for s in sizes[:-1]]
    for _ in range(a.repeats):
        plan += [(sizes[-1], 1), (sizes[-1], a.workers)]
    rows = []
    for i, (size, workers) in enumerate(plan):
        spec = {"train": data["corpora"][size], "eval": data["eval"], "ngram": a.ngram, "workers": workers}
        r = _run_child(work, f"run{i}", spec, a.timeout)
        r.update(train_tokens=size, workers=workers, tokens_per_s=size / r["seconds"])
        rows.append(r)
        print(f"{size:>13,} tokens  workers {workers}  {r['seconds']:7.2f} s  {r['tokens_per_s'] / 1e6:6.1f} M tok/s  "
              f"peak RSS main {r['maxrss_self_kb'] / 1024:6.1f} MiB  worker {r['maxrss_worker_kb'] / 1024:6.1f} MiB  "
              f"found {r['contaminated_items']}/{data['planted']}  cpu {r['cpu_s']:.1f} s  "
              f"load {r['load_average_after']:.1f}", flush=True)
    return rows


def _summary(rows: list[dict], sizes: list[int], workers: int) -> dict:
    one = [r for r in rows if r["workers"] == 1]
    small, large = one[0], [r for r in one if r["train_tokens"] == sizes[-1]]
    big1 = [r["seconds"] for r in large]
    bigw = [r["seconds"] for r in rows if r["train_tokens"] == sizes[-1] and r["workers"] == workers]
    peak = lambda r: max(r["maxrss_self_kb"], r["maxrss_worker_kb"])  # noqa: E731
    return {
        "corpus_growth": sizes[-1] / sizes[0],
        "peak_rss_kb_smallest_1_worker": peak(small),
        "peak_rss_kb_largest_1_worker": max(peak(r) for r in large),
        "peak_rss_ratio_largest_to_smallest": max(peak(r) for r in large) / peak(small),
        f"peak_worker_rss_kb_largest_{workers}_workers": max(
            r["maxrss_worker_kb"] for r in rows if r["train_tokens"] == sizes[-1] and r["workers"] == workers),
        f"time_ratio_1_to_{workers}_workers": float(np.median(big1) / np.median(bigw)),
        "seconds_1_worker_largest": big1,
        f"seconds_{workers}_workers_largest": bigw,
    }


def run_contamination_bench(a) -> int:
    """`megacpt bench contamination` (a: its parsed arguments)."""
    sizes = sorted(_parse_sizes(a.sizes))
    if a.workers < 2 or a.repeats < 1 or a.items < 1 or a.item_len < a.ngram:
        raise UserError("need --workers ≥ 2, --repeats ≥ 1, --items ≥ 1 and --item-len ≥ --ngram")
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="megacpt-bench-contamination-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    try:
        data = _prepare(work, a, sizes)
        rows = _runs(work, a, data, sizes)
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    out = {
        "benchmark": "contamination",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "megacpt bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "machine": {"cpu": cpu_model() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__, "load_average_before": load_before},
        "setup": {"sizes": sizes, "items": a.items, "item_len": a.item_len, "ngram": a.ngram, "vocab": VOCAB,
                  "doc_tokens": DOC_TOKENS, "planted": data["planted"], "workers": a.workers, "repeats": a.repeats},
        "memory_measure": "ru_maxrss (peak resident set, KiB) of a fresh process per run (RUSAGE_SELF) and of "
                          "its worker processes (RUSAGE_CHILDREN: the largest one)",
        "runs": rows,
        "summary": _summary(rows, sizes, a.workers),
    }
    print(json.dumps(out["summary"], indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {a.json}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["child"] or len(sys.argv) != 3:
        sys.exit("usage: python -m megacpt.bench.contamination child SPEC.json (run by megacpt bench contamination)")
    sys.exit(_child(sys.argv[2]))

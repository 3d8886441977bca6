"""Benchmark `megacpt prepare`: throughput against a plain `datasets.map` + numpy baseline, and
peak memory on a small vs a 10x larger corpus.

    python bench/bench_data.py                         # defaults: 20 MB throughput, 50 vs 500 MB RSS
    python bench/bench_data.py --throughput-mb 4 --rss-mb 40 80 --repeat 1 --json   # a quick run

Peak RSS depends on the largest documents as much as on anything else; the corpus holds all of
its kinds of documents only from ~32 MB on (the whole stdlib once), so compare sizes above that.

The corpus is real text available offline: the CPython standard library sources and the
`pydoc_data.topics` help texts, one JSON Lines document per file/topic, repeated to size. The
tokenizer is an HF tokenizer dir given with --tokenizer, or a byte-level BPE trained here on the
start of the corpus. Every measurement runs in a fresh subprocess, so imports, caches and peak
RSS (resource.getrusage(RUSAGE_CHILDREN) of a per-measurement helper process) do not leak from
one measurement into another. Throughput = tokens / seconds measured inside the subprocess after
its imports (prepare's own timer, which includes loading the tokenizer and writing the shard).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- corpus


def _corpus_documents():
    """Real offline text: stdlib .py files (not site-packages) and pydoc topics, in a fixed order."""
    import pydoc_data.topics

    for name in sorted(pydoc_data.topics.topics):
        yield pydoc_data.topics.topics[name]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def make_corpus(path: Path, megabytes: float) -> dict:
    """JSON Lines of about `megabytes` MB, the document stream repeated as often as needed."""
    target = int(megabytes * 1e6)
    written = docs = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            before = written
            for text in _corpus_documents():
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                docs += 1
                if written >= target:
                    break
            if written == before:
                raise SystemExit("no corpus text found")
    return {"path": str(path), "bytes": written, "documents": docs}


def train_tokenizer(out_dir: Path, corpus: Path, vocab_size: int) -> str:
    """A byte-level BPE on the first ~5 MB of the corpus, saved as an HF tokenizer directory."""
    if (out_dir / "tokenizer.json").exists():
        return str(out_dir)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        seen = 0
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                t = json.loads(line)["text"]
                seen += len(t)
                yield t
                if seen > 5e6:
                    return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out_dir)
    return str(out_dir)


# ----------------------------------------------------------------------------- measured runs


BASELINE = r"""
import json, sys, time
import numpy as np
import datasets
from transformers import AutoTokenizer

corpus, tok_dir, out, num_proc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
datasets.disable_progress_bars()
t0 = time.time()
tok = AutoTokenizer.from_pretrained(tok_dir)
eos = tok.eos_token_id
ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=out + ".cache")

def encode(batch):
    ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
    return {"ids": [x + [eos] for x in ids]}

ds = ds.map(encode, batched=True, batch_size=1000, remove_columns=["text"], num_proc=num_proc or None,
            load_from_cache_file=False)
sizes = np.array([len(x) for x in ds["ids"]], dtype=np.int32)
with open(out + ".bin", "wb") as f:
    for batch in ds.iter(batch_size=10000):
        f.write(np.concatenate([np.asarray(x, dtype=np.uint16) for x in batch["ids"]]).tobytes())
np.save(out + ".sizes.npy", sizes)
print(json.dumps({"tokens": int(sizes.sum()), "documents": len(sizes), "seconds": time.time() - t0}))
"""


def _measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd` under a helper process; return its stdout, wall time and peak RSS.

    The helper is a fresh interpreter whose only children are `cmd` (and, for prepare with
    workers, their workers, which `cmd` waits for): RUSAGE_CHILDREN's ru_maxrss there is the
    largest single process of this measurement (Linux reports KiB), not the sum over workers.
    """
    helper = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.time()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps({'rc': p.returncode, 'wall_s': time.time() - t, 'peak_rss_mb': ru.ru_maxrss / 1024,\n"
        "                  'cpu_s': ru.ru_utime + ru.ru_stime,\n"
        "                  'stdout': p.stdout, 'stderr': p.stderr[-2000:]}))\n"
    )
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        for k, v in env.items():
            if v is None:
                full_env.pop(k, None)
            else:
                full_env[k] = v
    p = subprocess.run([sys.executable, "-c", helper, *cmd], capture_output=True, text=True, env=full_env)
    res = json.loads(p.stdout)
    if res["rc"] != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res['stderr']}")
    return res


def run_prepare(corpus: Path, tok: str, out: Path, workers: int) -> dict:
    # transformers is imported before prepare's own timer starts, as the baseline's timer starts
    # after its imports: both then time tokenizer loading + reading + tokenizing + writing.
    launcher = "import sys, transformers; from megacpt.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", launcher, "prepare", "--input", str(corpus), "--tokenizer", tok,
           "--output", str(out), "--workers", str(workers), "--no-progress"]
    res = _measure(cmd)
    sc = json.loads(Path(f"{out}.json").read_text())
    return {
        "tool": "megacpt prepare",
        "workers": workers,
        "tokens": sc["tokens"],
        "documents": sc["documents"],
        "seconds": sc["seconds"],
        "tokens_per_s": sc["tokens"] / sc["seconds"],
        "wall_s": res["wall_s"],
        "cpu_s": res["cpu_s"],
        "peak_rss_mb": res["peak_rss_mb"],
    }


def run_baseline(corpus: Path, tok: str, out: Path, num_proc: int, threads: str) -> dict:
    """datasets.map (+ numpy to write a .bin); threads='1' pins the Rust tokenizer to one thread,
    'default' lets it use its own thread pool as a plain script would."""
    env = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"} if threads == "1" else {
        "TOKENIZERS_PARALLELISM": None, "RAYON_NUM_THREADS": None}
    shutil.rmtree(f"{out}.cache", ignore_errors=True)  # no reuse of an earlier run's Arrow cache
    res = _measure([sys.executable, "-c", BASELINE, str(corpus), tok, str(out), str(num_proc)], env)
    shutil.rmtree(f"{out}.cache", ignore_errors=True)
    stats = json.loads(res["stdout"].strip().splitlines()[-1])
    return {
        "tool": "datasets.map + numpy",
        "num_proc": num_proc,
        "tokenizer_threads": threads,
        "tokens": stats["tokens"],
        "documents": stats["documents"],
        "seconds": stats["seconds"],
        "tokens_per_s": stats["tokens"] / stats["seconds"],
        "wall_s": res["wall_s"],
        "cpu_s": res["cpu_s"],
        "peak_rss_mb": res["peak_rss_mb"],
    }


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--throughput-mb", type=float, default=20, help="corpus size for the throughput runs")
    ap.add_argument("--rss-mb", type=float, nargs=2, default=[50, 500], metavar=("SMALL", "LARGE"),
                    help="corpus sizes for the peak-memory comparison")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    ap.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: train a BPE here)")
    ap.add_argument("--vocab-size", type=int, default=16000, help="vocab of the BPE trained here")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repeats of the throughput runs (median reported)")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    ap.add_argument("--json", nargs="?", const=str(REPO / "bench" / "results" / "bench_data.json"), default=None,
                    metavar="PATH", help="write results as JSON (default path: bench/results/bench_data.json)")
    args = ap.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="bench_data_") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.time()
        corpus = make_corpus(work / f"corpus_{args.throughput_mb:g}MB.jsonl", args.throughput_mb)
        tok = args.tokenizer or train_tokenizer(work / "tokenizer", Path(corpus["path"]), args.vocab_size)
        print(f"corpus {corpus['bytes'] / 1e6:.1f} MB, {corpus['documents']} docs; tokenizer {tok} "
              f"({time.time() - t0:.1f}s)", flush=True)

        # Variants interleaved within each repeat, so that load from other processes on the
        # machine spreads over all of them instead of penalizing whichever ran at a bad moment.
        variants = [("prepare", w, None) for w in args.workers]
        if not args.skip_baseline:
            variants += [("baseline", 1, "1"), ("baseline", 1, "default"), ("baseline", 2, "1")]
        runs: dict = {v: [] for v in variants}
        for rep in range(args.repeat):
            for v in variants:
                kind, n, threads = v
                if kind == "prepare":
                    r = run_prepare(Path(corpus["path"]), tok, work / f"prep_w{n}", n)
                    label = f"prepare  workers={n}"
                else:
                    r = run_baseline(Path(corpus["path"]), tok, work / f"base_{n}_{threads}", n, threads)
                    label = f"baseline num_proc={n} tokenizer_threads={threads}"
                runs[v].append(r)
                print(f"[{rep + 1}/{args.repeat}] {label}: {r['tokens_per_s']:>10,.0f} tokens/s "
                      f"({r['tokens']:,} tokens, {r['documents']} docs, {r['seconds']:.1f}s, "
                      f"{r['cpu_s']:.1f} CPU-s, peak RSS {r['peak_rss_mb']:.0f} MB)", flush=True)
        throughput = []
        for v, rs in runs.items():
            summary = dict(rs[0])
            summary["runs"] = [{k: r[k] for k in ("seconds", "tokens_per_s", "wall_s", "cpu_s", "peak_rss_mb")} for r in rs]
            summary["seconds"] = statistics.median(r["seconds"] for r in rs)
            summary["tokens_per_s"] = summary["tokens"] / summary["seconds"]
            # CPU-seconds of the whole process tree, imports included: less sensitive to other
            # load on the machine than wall time, but it does not show parallel speed-up.
            summary["cpu_s"] = statistics.median(r["cpu_s"] for r in rs)
            summary["tokens_per_cpu_s"] = summary["tokens"] / summary["cpu_s"]
            throughput.append(summary)
        print("median tokens/s: " + ", ".join(
            f"{t['tool']} {t.get('workers', t.get('num_proc'))}{'' if 'workers' in t else ' proc/threads=' + t['tokenizer_threads']}"
            f" = {t['tokens_per_s']:,.0f}" for t in throughput))
        # prepare drops records whose text is empty (e.g. empty __init__.py files), the baseline
        # keeps them as a lone EOS: that is the only expected difference in counts.

        memory = []
        for mb in args.rss_mb:
            c = make_corpus(work / f"rss_{mb:g}MB.jsonl", mb)
            r = run_prepare(Path(c["path"]), tok, work / f"rss_{mb:g}", 1)
            r["corpus_mb"] = c["bytes"] / 1e6
            memory.append(r)
            print(f"peak RSS prepare workers=1 on {r['corpus_mb']:.0f} MB: {r['peak_rss_mb']:.0f} MB "
                  f"({r['tokens_per_s']:,.0f} tokens/s)", flush=True)
            os.remove(c["path"])
        result = {
            "benchmark": "megacpt prepare",
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "corpus": {"kind": "CPython stdlib sources + pydoc topics, JSON Lines", **corpus},
            "tokenizer": tok if args.tokenizer else f"byte-level BPE, vocab {args.vocab_size}, trained on the corpus",
            "throughput": throughput,
            "memory": memory,
            "total_s": time.time() - t0,
            "notes": [
                "tokens_per_s: tokens / median seconds timed inside the process after imports "
                "(prepare: its sidecar's timer; baseline: tokenizer load, load_dataset, map, writing the .bin)",
                "tokens_per_cpu_s: tokens / CPU-seconds of the whole process tree incl. imports",
                "peak_rss_mb: the largest single process (ru_maxrss of RUSAGE_CHILDREN), not a sum over workers",
                "prepare skips records with empty text; the baseline keeps them as a lone EOS",
            ],
        }
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {args.json}")
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())

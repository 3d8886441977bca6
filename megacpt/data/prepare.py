"""`megacpt prepare`: tokenize raw text into Megatron .bin/.idx shards (see indexed.py).

Pipeline: readers.py enumerates the input records in order; workers.py tokenizes them in batches
(in worker processes) and hands the results back in input order; shards.py streams them into the
output shards and commits them with the sidecar (sidecar.py) all at once. The output is
byte-identical whatever the number of workers. Every record becomes one document (its tokens plus
EOS), except records whose text is empty (or null), which are skipped and counted, and
undecodable ones under `--on-decode-error skip`.

`--num-shards N --shard-index I` selects the contiguous records [total*I//N, total*(I+1)//N).
That needs the total, so such runs first *count* the records of every input in order (see
readers.py for what counting costs per format). We count records rather than split byte ranges
because a count split is exact for every input kind, lands on document boundaries by
construction, and makes N split runs merged byte-identical to one unsplit run (record numbering,
and therefore the `--valid-fraction` choice, is global). The price is one extra read of the
inputs per task, which is much cheaper than tokenizing them.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megacpt.data.indexed import dtype_for_vocab
from megacpt.data.readers import Source, resolve_inputs
from megacpt.data.shards import PrepareOutput
from megacpt.data.sidecar import SIDECAR_FORMAT, SIDECAR_VERSION, created_by
from megacpt.data.tokenizer import TokenizerInfo, load_tokenizer
from megacpt.data.workers import Options, Stats, batches, run_batches
from megacpt.errors import DataError, UserError


def parse_size(text) -> int:
    """'100MB' -> 100_000_000, '1GiB' -> 2**30, '4096' -> 4096 (bytes of .bin)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?)(b?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"cannot parse size {text!r}: use e.g. 500MB, 2GiB or a number of bytes")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), bool(m.group(3))
    power = "kmgtp".index(unit) + 1 if unit else 0
    value = int(number * ((1024 if binary else 1000) ** power))
    if value <= 0:
        raise UserError(f"size {text!r} must be positive")
    return value


@dataclass
class Settings:
    """How to prepare (the `megacpt prepare` options); checked when made."""

    text_key: str = "text"
    text_mode: str = "file"
    workers: int = 1
    max_shard_size: int | str | None = None
    bos: bool = False
    eos: bool = True
    valid_fraction: float = 0.0
    num_shards: int = 1
    shard_index: int | None = None
    on_decode_error: str = "error"
    progress: bool | None = None
    max_bytes: int | None = field(init=False, default=None)  # max_shard_size in bytes

    def __post_init__(self) -> None:
        if self.text_mode not in ("file", "blocks", "lines"):
            raise UserError(f"--text-mode {self.text_mode}: use file, blocks or lines")
        if self.on_decode_error not in ("skip", "error"):
            raise UserError(f"--on-decode-error {self.on_decode_error}: use skip or error")
        if not 0 <= self.valid_fraction < 1:
            raise UserError(f"--valid-fraction {self.valid_fraction} must be in [0, 1)")
        if self.num_shards < 1:
            raise UserError(f"--num-shards {self.num_shards} must be >= 1")
        if self.shard_index is None:
            if self.num_shards > 1:
                raise UserError("--num-shards needs --shard-index (0-based)")
            self.shard_index = 0
        if not 0 <= self.shard_index < self.num_shards:
            raise DataError(
                f"--shard-index {self.shard_index} is out of range for --num-shards {self.num_shards} "
                f"(0..{self.num_shards - 1})"
            )
        if self.workers < 1:
            raise UserError(f"--workers {self.workers} must be >= 1")
        self.max_bytes = parse_size(self.max_shard_size) if self.max_shard_size is not None else None


def prepare(inputs, tokenizer: str, output: str, **settings) -> dict:
    """Tokenize `inputs` into shards under `output`; returns the sidecar dict (also written).

    `settings`: the fields of Settings (text_key, text_mode, workers, max_shard_size, bos, eos,
    valid_fraction, num_shards, shard_index, on_decode_error, progress).
    """
    t0 = time.time()
    output = str(output)
    s = Settings(**settings)
    if not output or output.endswith(("/", os.sep)) or Path(output).is_dir():
        raise UserError(f"--output {output} must be a file prefix (e.g. data/corpus), not a directory")
    sources = resolve_inputs(inputs, s.text_mode, s.text_key)
    tok = _load_tokenizer(tokenizer, s.bos, s.eos)
    dtype = dtype_for_vocab(tok.vocab_size)
    counts, lo, hi = _part_range(sources, s.num_shards, s.shard_index)
    opts = Options(
        text_key=s.text_key,
        skip_undecodable=s.on_decode_error == "skip",
        bos_id=tok.bos_id if s.bos else None,
        eos_id=tok.eos_id if s.eos else None,
        dtype=dtype.name,
    )
    stats = Stats()
    out = PrepareOutput(output)
    results = None
    bar = _progress(None if counts is None else hi - lo, s.progress)
    try:
        out.open(dtype, s.max_bytes, with_valid=s.valid_fraction > 0)
        results = run_batches(batches(sources, stats, counts, lo, hi), s.workers, tok.spec, opts)
        _write(results, out, stats, s.valid_fraction, bar, t0)
        _check_produced(out, stats, s.num_shards, s.shard_index)
        sidecar = _sidecar(tok, dtype, out, stats, s, t0)
        out.commit(sidecar)
        return sidecar
    except BaseException:
        bar.close()
        if results is not None:
            results.close()  # stops the worker pool now, not when the traceback is collected
        out.abort()
        raise


def _load_tokenizer(name: str, bos: bool, eos: bool) -> TokenizerInfo:
    tok = load_tokenizer(name)
    if eos and tok.eos_id is None:
        raise DataError(f"tokenizer {name} has no EOS token; use one that has, or pass --no-eos")
    if bos and tok.bos_id is None:
        raise DataError(f"tokenizer {name} has no BOS token; drop --bos")
    return tok


def _part_range(sources: list[Source], num_shards: int, shard_index: int):
    """(record counts per source, first, end) of this part's global records; (None, 0, None): all."""
    if num_shards == 1:
        return None, 0, None
    counts = [src.count() for src in sources]
    total = sum(counts)
    if total == 0:
        raise DataError("inputs hold no documents; check the --input files and --text-mode")
    return counts, total * shard_index // num_shards, total * (shard_index + 1) // num_shards


def _valid_mask(record_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Record r is held out iff floor((r+1)F) > floor(rF): exactly floor(total*F) records, spread
    evenly, and a pure function of the global record number, so split runs agree with one run."""
    if fraction <= 0:
        return np.zeros(len(record_ids), dtype=bool)
    r = record_ids.astype(np.float64)
    return np.floor((r + 1) * fraction) > np.floor(r * fraction)


def _progress(total, enabled):
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, unit="doc", unit_scale=True, disable=not enabled, dynamic_ncols=True)


def _write(results, out: PrepareOutput, stats: Stats, valid_fraction: float, bar, t0: float) -> None:
    """Stream the tokenized batches into the output writers, updating the progress bar."""
    tokens_seen = 0
    last_post = 0.0
    for first, n, (tokens, sizes, undecodable, empty) in results:
        stats.undecodable += undecodable
        stats.empty += empty
        out.add(tokens, sizes, _valid_mask(np.arange(first, first + n, dtype=np.int64), valid_fraction))
        tokens_seen += tokens.size
        bar.update(n)
        now = time.time()
        if now - last_post > 0.5:
            bar.set_postfix(tok_s=f"{tokens_seen / max(now - t0, 1e-9):,.0f}", refresh=False)
            last_post = now
    bar.close()


def _check_produced(out: PrepareOutput, stats: Stats, num_shards: int, shard_index: int) -> None:
    produced = out.num_documents
    if num_shards == 1 and stats.records == 0:
        raise DataError("inputs hold no documents; check the --input files and --text-mode")
    if num_shards == 1 and produced == 0:
        raise DataError(
            f"no documents left ({stats.empty} empty, {stats.undecodable} undecodable records); check --text-key"
        )
    if produced == 0:
        print(f"warning: shard {shard_index}/{num_shards} holds no documents", file=sys.stderr)


def _sidecar(tok: TokenizerInfo, dtype, out: PrepareOutput, stats: Stats, s: Settings, t0: float) -> dict:
    train, valid = out.train, out.valid
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "tokenizer": tok.identity(),
        # Top-level copies for quick checks (the trainer's vocab check reads "vocab_size").
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "dtype": dtype.name,
        "bos": bool(s.bos),
        "eos": bool(s.eos),
        "documents": train.num_documents,
        "tokens": train.num_tokens,
        "shards": [
            {"prefix": Path(w.prefix).name, "documents": w.num_documents, "tokens": w.num_tokens}
            for w in train.writers
        ],
        "valid": None
        if valid is None
        else {"prefix": Path(valid.prefix).name, "documents": valid.num_documents, "tokens": valid.num_tokens},
        "valid_fraction": s.valid_fraction,
        "records": stats.records,
        "skipped": {"empty": stats.empty, "undecodable": stats.undecodable},
        "sources": stats.per_source,
        "text_key": s.text_key,
        "text_mode": s.text_mode,
        "num_shards": s.num_shards,
        "shard_index": s.shard_index,
        "created_by": created_by(),
        "seconds": round(time.time() - t0, 3),
    }


# ----------------------------------------------------------------------------- command


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main_args(args) -> int:
    """`megacpt prepare` with parsed arguments (parser: megacpt/cli/prepare.py)."""
    workers = args.workers if args.workers is not None else min(_usable_cpus(), 32)
    sc = prepare(
        args.input,
        args.tokenizer,
        args.output,
        text_key=args.text_key,
        text_mode=args.text_mode,
        workers=workers,
        max_shard_size=args.max_shard_size,
        bos=args.bos,
        eos=not args.no_eos,
        valid_fraction=args.valid_fraction,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        on_decode_error=args.on_decode_error,
        progress=args.progress,
    )
    shards = len(sc["shards"])
    line = f"wrote {args.output}: {sc['documents']:,} documents, {sc['tokens']:,} tokens ({sc['dtype']}"
    line += f", {shards} shards)" if shards > 1 else ")"
    if sc["valid"]:
        line += f"; valid: {sc['valid']['documents']:,} documents, {sc['valid']['tokens']:,} tokens"
    skipped = sc["skipped"]
    if skipped["empty"] or skipped["undecodable"]:
        line += f"; skipped {skipped['empty']} empty, {skipped['undecodable']} undecodable"
    print(line + f" in {sc['seconds']:.1f}s")
    return 0

"""Tokenizing for `megacpt prepare`: batches of records, worker processes, results in order.

The main process reads input records in order and cuts them into batches (bounded by count and
bytes); worker processes decode/parse and tokenize each batch; the main process collects results
strictly in submission order. Only a few batches are in flight at once, so memory is bounded by
the batch size, not the corpus size, and the output is byte-identical whatever the number of
workers.

Spawned workers import this module, so it stays light: numpy, the readers and the tokenizer
adapters (which import only the one tokenizer library a run uses).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import signal
import tempfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from megacpt.data.readers import Source, Undecodable, to_text
from megacpt.data.tokenizer import Encoder
from megacpt.errors import DataError, UserError

# Batches: big enough that per-batch costs (IPC, Python loops) vanish next to tokenizing,
# small enough that (in-flight batches x size) stays a few tens of MB.
BATCH_DOCS = 1024
BATCH_BYTES = 1 << 20


@dataclass
class Options:
    """What a worker needs besides the tokenizer to turn a batch into tokens."""

    text_key: str
    skip_undecodable: bool
    bos_id: int | None
    eos_id: int | None
    dtype: str


@dataclass
class Stats:
    """Records read, per source, and records that yielded no document (for the sidecar)."""

    records: int = 0
    undecodable: int = 0
    empty: int = 0
    per_source: list = field(default_factory=list)


# ----------------------------------------------------------------------------- batching


def batches(sources: list[Source], stats: Stats, counts=None, lo: int = 0, hi: int | None = None):
    """(batch, first global record number) in input order; batches never span two sources.

    With `counts` (from the counting pass) only global records [lo, hi) are read; without, all.
    """
    offset = 0
    for i, src in enumerate(sources):
        if counts is not None:
            a, b = max(lo - offset, 0), max(min(hi - offset, counts[i]), 0)
            if b <= a:
                stats.per_source.append({"path": src.path, "records": 0})
                offset += counts[i]
                continue
        else:
            a, b = 0, None
        n = 0
        locs: list = []
        payloads: list = []
        size = 0
        kind = None
        first = offset + a
        for loc, payload, pkind in src.records(a, b):
            kind = pkind
            locs.append(loc)
            payloads.append(payload)
            size += len(payload) if payload is not None else 0
            n += 1
            if len(payloads) >= BATCH_DOCS or size >= BATCH_BYTES:
                yield (src.path, src.unit, kind, locs, payloads), first
                first += len(payloads)
                locs, payloads, size = [], [], 0
        if payloads:
            yield (src.path, src.unit, kind, locs, payloads), first
        stats.records += n
        stats.per_source.append({"path": src.path, "records": n})
        offset += counts[i] if counts is not None else n


# ----------------------------------------------------------------------------- running


def run_batches(batches, workers: int, spec: dict, opts: Options):
    """Yield (batch first record, n records, result) in input order."""
    if workers <= 1:
        return _run_inline(batches, spec, opts)
    if getattr(mp.current_process(), "_inheriting", False):
        # We are a spawned worker re-running a script that calls prepare() at import time;
        # multiprocessing would fail obscurely (and the parent hang), so say what to do.
        raise UserError("prepare(workers > 1) must be called under `if __name__ == '__main__':`")
    return _run_pool(batches, workers, spec, opts)


def _run_inline(batches, spec: dict, opts: Options):
    # --workers 1 means one core: keep the Rust tokenizer from starting its own thread pool
    # (it reads this variable at every batch call, so setting it here suffices).
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        encoder = Encoder(spec)
        for batch, first in batches:
            yield first, len(batch[4]), _process(encoder, opts, batch)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _run_pool(batches, workers: int, spec: dict, opts: Options):
    # spawn, not fork: the parent may already run tokenizer/torch threads, and a forked child
    # inherits their locks; workers import only numpy + the tokenizer library, so spawn is cheap.
    # ProcessPoolExecutor (not Pool): a worker killed by the OOM killer fails the run instead of
    # hanging it.
    # The tokenizer (MBs of JSON) goes through a file, not the initializer arguments: those are
    # written into a pipe that CPython keeps open at both ends while writing, so a child that dies
    # during start-up would leave the parent blocked forever on a payload above the pipe buffer.
    fd, spec_file = tempfile.mkstemp(prefix="megacpt-prepare-", suffix=".pkl")
    with os.fdopen(fd, "wb") as f:
        pickle.dump((spec, opts), f)
    ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(spec_file,))
    pending: deque = deque()
    finished = False
    try:
        for batch, first in batches:
            pending.append((first, len(batch[4]), ex.submit(_worker_process, batch)))
            # A bounded window keeps memory flat and order is restored by draining FIFO.
            while len(pending) >= 2 * workers:
                f, n, fut = pending.popleft()
                yield f, n, fut.result()
        while pending:
            f, n, fut = pending.popleft()
            yield f, n, fut.result()
        finished = True
    finally:
        close_pool(ex, finished)
        os.remove(spec_file)


def close_pool(ex, finished: bool) -> None:
    """Shut a ProcessPoolExecutor down: wait when every result came back; after an error or
    Ctrl-C the remaining results are worthless, so the workers are terminated instead."""
    if finished:
        ex.shutdown(wait=True)
        return
    procs = list((getattr(ex, "_processes", None) or {}).values())
    ex.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.join(timeout=5)


# ----------------------------------------------------------------------------- in a worker


_WORKER: tuple | None = None


def _init_worker(spec_file: str) -> None:
    # One single-threaded tokenizer per process: Rust-side threads would fight the processes for
    # the same cores and stop them from scaling. Must be set before the first encode.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    # Ctrl-C goes to the whole process group; the main process alone decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with open(spec_file, "rb") as f:
        spec, opts = pickle.load(f)
    global _WORKER
    _WORKER = (Encoder(spec), opts)


def _worker_process(batch):
    return _process(_WORKER[0], _WORKER[1], batch)


def _process(encoder: Encoder, opts: Options, batch):
    """Decode/parse/tokenize one batch.

    Returns (tokens, sizes, undecodable, empty): tokens concatenated in the output dtype; sizes
    per record, -1 for a record that yields no document.
    """
    path, unit, kind, locs, payloads = batch
    texts: list[str] = []
    slot = np.full(len(payloads), -1, dtype=np.int64)
    undecodable = empty = 0
    for i, (loc, payload) in enumerate(zip(locs, payloads)):
        try:
            text = to_text(kind, payload, opts.text_key, path, unit, loc)
        except Undecodable as e:
            if not opts.skip_undecodable:
                raise DataError(
                    f"{path}: {unit} {loc} is not valid UTF-8 ({e}); fix the file or pass --on-decode-error skip"
                ) from None
            undecodable += 1
            continue
        if not text:
            empty += 1
            continue
        slot[i] = len(texts)
        texts.append(text)
    ids = encoder.encode(texts)
    extra = (opts.bos_id is not None) + (opts.eos_id is not None)
    flat: list[int] = []
    sizes = np.full(len(payloads), -1, dtype=np.int64)
    for i in range(len(payloads)):
        j = slot[i]
        if j < 0:
            continue
        doc = ids[j]
        if not doc and not extra:
            empty += 1
            continue
        if opts.bos_id is not None:
            flat.append(opts.bos_id)
        flat.extend(doc)
        if opts.eos_id is not None:
            flat.append(opts.eos_id)
        sizes[i] = len(doc) + extra
    # numpy refuses Python ints that do not fit the dtype, so an out-of-range id cannot wrap.
    result = np.array(flat, dtype=opts.dtype), sizes, undecodable, empty
    del ids, flat, texts
    _release_memory()
    return result


_MALLOC_TRIM = None


def _release_memory() -> None:
    """Hand freed heap back to the OS after each batch (glibc only).

    A batch's tokenizer intermediates are ~50x its text size and freed right after, but glibc
    keeps the freed pages, and fragmentation made RSS creep up in steps on long runs (measured:
    +50 MB between 40 and 100 MB of corpus); trimming keeps the peak to one batch's worth.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)

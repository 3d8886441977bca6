"""`megacpt prepare`: tokenize raw text into Megatron .bin/.idx shards (see indexed.py).

Pipeline: the main process reads input records in order and cuts them into batches (bounded
by count and bytes); worker processes decode/parse and tokenize each batch; the main process
collects results strictly in submission order and streams them into the writers. Only a few
batches are in flight at once, so memory is bounded by the batch size, not the corpus size, and
the output is byte-identical whatever the number of workers.

A *record* is one unit read from an input: a line of JSON Lines, an element of a JSON array, a
row of Parquet or of a `save_to_disk` dataset, and for plain text a file, a blank-line separated
block or a line (`--text-mode`). Every record becomes one document (its tokens plus EOS), except
records whose text is empty (or null), which are skipped and counted, and undecodable ones under
`--on-decode-error skip`.

`--num-shards N --shard-index I` selects the contiguous records [total*I//N, total*(I+1)//N).
That needs the total, so such runs first *count* the records of every input in order: free for
Parquet and `save_to_disk` (metadata), a byte scan of lines for text and JSON Lines (no decoding,
no JSON parsing), a parse for JSON arrays. We count records rather than split byte ranges because
a count split is exact for every input kind, lands on document boundaries by construction, and
makes N split runs merged byte-identical to one unsplit run (record numbering, and therefore the
`--valid-fraction` choice, is global). The price is one extra read of the inputs per task, which
is much cheaper than tokenizing them.
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import hashlib
import json
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megacpt.data.indexed import (
    IndexedDatasetWriter,
    bin_path,
    dtype_for_vocab,
    idx_path,
)
from megacpt.errors import DataError, UserError

SIDECAR_FORMAT = "megacpt-tokenized"
SIDECAR_VERSION = 1

# Batches: big enough that per-batch costs (IPC, Python loops) vanish next to tokenizing,
# small enough that (in-flight batches x size) stays a few tens of MB.
BATCH_DOCS = 1024
BATCH_BYTES = 1 << 20
# One document above this is almost surely a wrong --text-mode (a whole corpus as one "file"
# document); tokenizing it would take many GB of memory for offsets and token strings.
MAX_DOC_BYTES = 128 << 20

TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
JSON_SUFFIXES = {".json"}
PARQUET_SUFFIXES = {".parquet", ".pq"}


# ----------------------------------------------------------------------------- helpers


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


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _base_suffix(path: str) -> str:
    """'.jsonl' for 'a.jsonl' and 'a.jsonl.gz'."""
    p = Path(path)
    return Path(p.stem).suffix.lower() if p.suffix.lower() == ".gz" else p.suffix.lower()


def _field(obj, key: str):
    """obj[key]; a dotted key ('meta.text') walks nested objects when no such flat key exists."""
    if key in obj:
        return obj[key]
    cur = obj
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(key)
        cur = cur[part]
    return cur


# ----------------------------------------------------------------------------- tokenizers


@dataclass
class TokenizerInfo:
    kind: str  # "hf" | "sentencepiece"
    name: str
    path: str | None
    vocab_size: int
    vocab_hash: str
    eos_id: int | None
    bos_id: int | None
    spec: dict  # what a worker needs to rebuild the encoder (picklable)

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "name_or_path": self.name,
            "path": self.path,
            "vocab_size": self.vocab_size,
            "vocab_hash": self.vocab_hash,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
        }


def _hash_pieces(pieces) -> str:
    h = hashlib.sha256()
    for piece, idx in pieces:
        h.update(f"{idx}\t{piece}\n".encode("utf-8", "surrogatepass"))
    return "sha256:" + h.hexdigest()


def load_tokenizer(name: str) -> TokenizerInfo:
    """An HF tokenizer (local dir or cached hub id) or a sentencepiece .model file."""
    path = Path(name)
    if path.is_file() and path.suffix == ".model":
        return _load_sentencepiece(path)
    looks_local = path.is_absolute() or name.startswith(".") or path.suffix in (".model", ".json")
    if not path.exists() and (looks_local or name.count("/") > 1):
        raise DataError(
            f"tokenizer {name} does not exist: pass an HF tokenizer directory, a hub id, or a sentencepiece .model"
        )
    if path.is_file():
        raise DataError(f"tokenizer {name} is a file: pass its HF tokenizer directory or a sentencepiece .model")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # transformers raises OSError/ValueError/... depending on what is missing
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load tokenizer {name} ({reason}); pass an HF tokenizer dir or a .model") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # Workers rebuild the exact Rust tokenizer that `tok` wraps (after whatever transformers
        # adjusted at load time) without importing transformers, which takes seconds per process.
        spec = {
            "kind": "tokenizers",
            "json": backend.to_str(),
            "encode_special_tokens": bool(getattr(tok, "split_special_tokens", False)),
        }
    else:
        spec = {"kind": "hf", "name": name}
    vocab = tok.get_vocab()
    return TokenizerInfo(
        kind="hf",
        name=name,
        path=str(path.resolve()) if path.exists() else None,
        vocab_size=len(tok),
        vocab_hash=_hash_pieces(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))),
        eos_id=tok.eos_token_id,
        bos_id=tok.bos_token_id,
        spec=spec,
    )


def _load_sentencepiece(path: Path) -> TokenizerInfo:
    import sentencepiece as spm

    proto = path.read_bytes()
    try:
        sp = spm.SentencePieceProcessor(model_proto=proto)
    except Exception:
        raise DataError(f"{path} is not a sentencepiece model; pass a valid .model or an HF tokenizer dir") from None
    n = sp.get_piece_size()
    eos, bos = sp.eos_id(), sp.bos_id()
    return TokenizerInfo(
        kind="sentencepiece",
        name=str(path),
        path=str(path.resolve()),
        vocab_size=n,
        vocab_hash=_hash_pieces((sp.id_to_piece(i), i) for i in range(n)),
        eos_id=eos if eos >= 0 else None,
        bos_id=bos if bos >= 0 else None,
        spec={"kind": "sentencepiece", "proto": proto},
    )


class _Encoder:
    """Batch text -> list of token id lists, rebuilt inside each worker from TokenizerInfo.spec."""

    def __init__(self, spec: dict):
        kind = spec["kind"]
        self.kind = kind
        if kind == "tokenizers":
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(spec["json"])
            # transformers turns these off per call; a saved tokenizer.json may carry them.
            tok.no_truncation()
            tok.no_padding()
            tok.encode_special_tokens = spec["encode_special_tokens"]
            self._tok = tok
            # encode_batch_fast skips computing offsets we never use.
            self._encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        elif kind == "sentencepiece":
            import sentencepiece as spm

            self._tok = spm.SentencePieceProcessor(model_proto=spec["proto"])
        elif kind == "hf":
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(spec["name"])
        else:
            raise ValueError(kind)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.kind == "tokenizers":
            return [e.ids for e in self._encode(texts, add_special_tokens=False)]
        if self.kind == "sentencepiece":
            return self._tok.encode(texts, out_type=int, num_threads=1)
        return self._tok(texts, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- inputs


class _Undecodable(Exception):
    pass


@dataclass
class Source:
    """One input file or dataset directory, enumerated as records in a fixed order."""

    path: str
    kind: str  # text | jsonl | json | parquet | dataset
    text_mode: str = "file"
    text_key: str = "text"

    @property
    def unit(self) -> str:
        """How a record is located in error messages."""
        return {"text": "line", "jsonl": "line", "json": "element", "parquet": "row", "dataset": "row"}[self.kind]

    # Every record yields (location, payload, payload kind), payload kinds:
    #   "bytes": raw text to decode; "jsonl": a raw JSON line; "jstr": text from JSON (may hold
    #   lone surrogates); "str": valid text (Arrow strings are validated UTF-8) or None.

    def records(self, start: int = 0, stop: int | None = None):
        """Records number start..stop-1 of this source (0-based), in order."""
        if self.kind == "parquet":
            yield from self._parquet(start, stop)
            return
        if self.kind == "dataset":
            yield from self._dataset(start, stop)
            return
        gen = {"text": self._text, "jsonl": self._jsonl, "json": self._json}[self.kind]()
        for i, rec in enumerate(gen):
            if stop is not None and i >= stop:
                break
            if i >= start:
                yield rec

    def count(self) -> int:
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).metadata.num_rows
        if self.kind == "dataset":
            return len(self._open_dataset())
        # Same generators as reading, so counting and reading agree on what a record is.
        gen = {"text": self._text, "jsonl": self._jsonl, "json": self._json}[self.kind]
        return sum(1 for _ in gen(count_only=True))

    # --- plain text

    def _text(self, count_only: bool = False):
        mode = self.text_mode
        if mode == "file":
            size = os.path.getsize(self.path)
            if size > MAX_DOC_BYTES and not self.path.endswith(".gz"):
                raise DataError(
                    f"{self.path}: {size >> 20} MiB is too large for one document; use --text-mode blocks or lines"
                )
            if count_only:
                yield (1, None, "bytes")
                return
            with _open_binary(self.path) as f:
                data = f.read(MAX_DOC_BYTES + 1)
            if len(data) > MAX_DOC_BYTES:
                raise DataError(f"{self.path}: too large for one document; use --text-mode blocks or lines")
            yield (1, _strip_bom(data), "bytes")
            return
        with _open_binary(self.path) as f:
            if mode == "lines":
                for no, line in enumerate(f, 1):
                    if line.strip():
                        if no == 1:
                            line = _strip_bom(line)
                        yield (no, None if count_only else line.rstrip(b"\r\n"), "bytes")
                return
            # blocks: runs of non-blank lines separated by blank lines
            block: list[bytes] = []
            size = 0
            first = 0
            for no, line in enumerate(f, 1):
                if line.strip():
                    if not block:
                        first = no
                    if no == 1:
                        line = _strip_bom(line)
                    size += len(line)
                    if size > MAX_DOC_BYTES:
                        raise DataError(f"{self.path}:{first}: block larger than {MAX_DOC_BYTES >> 20} MiB")
                    block.append(b"" if count_only else line)
                elif block:
                    yield (first, None if count_only else b"".join(block).rstrip(b"\r\n"), "bytes")
                    block, size = [], 0
            if block:
                yield (first, None if count_only else b"".join(block).rstrip(b"\r\n"), "bytes")

    # --- JSON

    def _jsonl(self, count_only: bool = False):
        with _open_binary(self.path) as f:
            for no, line in enumerate(f, 1):
                if len(line) > MAX_DOC_BYTES:
                    raise DataError(f"{self.path}:{no}: line larger than {MAX_DOC_BYTES >> 20} MiB")
                if line.strip():
                    # JSON parsing happens in the workers: the main process stays a cheap reader.
                    yield (no, None if count_only else line, "jsonl")

    def _json(self, count_only: bool = False):
        with _open_binary(self.path) as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"\xef\xbb\xbf"):
            head = head[3:].lstrip()
        if not head.startswith(b"["):
            # HF `Dataset.to_json` and many tools write JSON Lines under a .json name.
            yield from self._jsonl(count_only)
            return
        for i, obj in enumerate(_iter_json_array(self.path)):
            if count_only:
                yield (i, None, "jstr")
                continue
            yield (i, self._extract(obj, f"element {i}"), "jstr")

    def _extract(self, obj, where: str):
        if not isinstance(obj, dict):
            raise DataError(f"{self.path}: {where} is not a JSON object; expected {{\"{self.text_key}\": ...}}")
        try:
            return _field(obj, self.text_key)
        except KeyError:
            fields = ", ".join(list(obj)[:8])
            raise DataError(
                f"{self.path}: {where} has no field '{self.text_key}' (fields: {fields}); pass --text-key"
            ) from None

    # --- Arrow

    def check_columns(self) -> None:
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            try:
                schema = pq.ParquetFile(self.path).schema_arrow
            except Exception as e:
                raise DataError(f"{self.path}: not a readable Parquet file ({e})") from None
        elif self.kind == "dataset":
            schema = self._open_dataset().data.schema
        else:
            return
        if self.text_key not in schema.names:
            raise DataError(
                f"{self.path}: no column '{self.text_key}' (columns: {', '.join(schema.names)}); pass --text-key"
            )
        import pyarrow as pa

        t = schema.field(self.text_key).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise DataError(f"{self.path}: column '{self.text_key}' is {t}, not text; pass --text-key")

    def _parquet(self, start: int, stop: int | None):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.path)
        stop = pf.metadata.num_rows if stop is None else stop
        row = 0
        for rg in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if row + n <= start:  # skip whole row groups without reading them
                row += n
                continue
            if row >= stop:
                break
            for batch in pf.iter_batches(batch_size=BATCH_DOCS, row_groups=[rg], columns=[self.text_key]):
                for text in batch.column(0).to_pylist():
                    if start <= row < stop:
                        yield (row, text, "str")
                    row += 1

    def _open_dataset(self):
        if not hasattr(self, "_ds"):
            import datasets

            try:
                ds = datasets.load_from_disk(self.path)
            except Exception as e:
                raise DataError(f"{self.path}: cannot load saved dataset ({e})") from None
            if isinstance(ds, datasets.DatasetDict):
                splits = ", ".join(ds)
                raise DataError(f"{self.path} holds splits ({splits}); pass one split directory, e.g. {self.path}/train")
            self._ds = ds
        return self._ds

    def _dataset(self, start: int, stop: int | None):
        # Memory-mapped Arrow; slices materialize one batch of Python strings at a time.
        ds = self._open_dataset().select_columns([self.text_key]).with_format("arrow")
        stop = len(ds) if stop is None else min(stop, len(ds))
        for i in range(start, stop, BATCH_DOCS):
            table = ds[i : min(i + BATCH_DOCS, stop)]
            for j, text in enumerate(table.column(0).to_pylist()):
                yield (i + j, text, "str")


def _strip_bom(data: bytes) -> bytes:
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def _iter_json_array(path: str, chunk: int = 1 << 20):
    """Elements of a top-level JSON array, parsed incrementally (memory ~ the largest element).

    Invalid UTF-8 is decoded with surrogateescape so that it surfaces as lone surrogates in the
    element's text and gets the --on-decode-error treatment there rather than failing the file.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    ws = re.compile(r"[ \t\n\r]*")
    with _open_binary(path) as f:
        buf = utf8.decode(f.read(chunk))
        if buf.startswith("\ufeff"):
            buf = buf[1:]
        eof = False
        pos = ws.match(buf, 0).end()
        assert buf[pos] == "["
        pos += 1
        index = 0
        want = chunk
        expect_value = True
        while True:
            pos = ws.match(buf, pos).end()
            if pos >= len(buf) and not eof:
                data = f.read(want)
                eof = not data
                buf = buf[pos:] + utf8.decode(data, final=eof)
                pos = 0
                continue
            if pos >= len(buf):
                raise DataError(f"{path}: JSON array ends early (after element {index}); the file is truncated")
            c = buf[pos]
            if not expect_value:
                if c == ",":
                    pos += 1
                    expect_value = True
                    continue
                if c == "]":
                    return
                raise DataError(f"{path}: invalid JSON after element {index - 1} (found {c!r})")
            if c == "]" and index == 0:
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if eof:
                    raise DataError(f"{path}: invalid JSON in element {index}: {e.msg}") from None
                # Probably an element cut by the buffer end: read more (doubling, so a huge
                # element costs linear, not quadratic, re-parsing) and retry.
                data = f.read(want)
                want *= 2
                eof = not data
                buf = buf[pos:] + utf8.decode(data, final=eof)
                pos = 0
                continue
            want = chunk
            yield obj
            index += 1
            pos = end
            expect_value = False
            if pos > chunk:  # drop consumed text so the buffer stays small
                buf, pos = buf[pos:], 0


def resolve_inputs(paths, text_mode: str, text_key: str) -> list[Source]:
    """Input paths -> sources in order; a plain directory expands to its files, sorted."""
    if not paths:
        raise UserError("no --input given")
    sources: list[Source] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise DataError(f"input {raw} does not exist; check the --input path")
        if p.is_dir():
            if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
                sources.append(Source(str(p), "dataset", text_mode, text_key))
                continue
            files = sorted(q for q in p.rglob("*") if q.is_file() and _kind_of(str(q)) is not None)
            if not files:
                raise DataError(f"input directory {raw} has no .txt/.jsonl/.json/.parquet files")
            sources.extend(Source(str(q), _kind_of(str(q)), text_mode, text_key) for q in files)
            continue
        kind = _kind_of(raw)
        if kind is None:
            raise DataError(
                f"input {raw}: unknown file type; use .txt, .jsonl, .json, .parquet (or .gz of the text ones)"
            )
        sources.append(Source(raw, kind, text_mode, text_key))
    for s in sources:
        s.check_columns()
    return sources


def _kind_of(path: str) -> str | None:
    suffix = _base_suffix(path)
    if suffix in PARQUET_SUFFIXES and not path.endswith(".gz"):
        return "parquet"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in TEXT_SUFFIXES:
        return "text"
    return None


# ----------------------------------------------------------------------------- workers


@dataclass
class _Options:
    text_key: str
    skip_undecodable: bool
    bos_id: int | None
    eos_id: int | None
    dtype: str


_WORKER: tuple | None = None


def _init_worker(spec_file: str) -> None:
    # One single-threaded tokenizer per process: Rust-side threads would fight the processes for
    # the same cores and stop them from scaling. Must be set before the first encode.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    import signal

    # Ctrl-C goes to the whole process group; the main process alone decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import pickle

    with open(spec_file, "rb") as f:
        spec, opts = pickle.load(f)
    global _WORKER
    _WORKER = (_Encoder(spec), opts)


def _worker_process(batch):
    return _process(_WORKER[0], _WORKER[1], batch)


def _process(encoder: _Encoder, opts: _Options, batch):
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
            text = _to_text(kind, payload, opts.text_key, path, unit, loc)
        except _Undecodable as e:
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
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def _to_text(kind: str, payload, text_key: str, path: str, unit: str, loc) -> str | None:
    if kind == "bytes":
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Undecodable(f"byte {e.start}") from None
    if kind == "jsonl":
        try:
            obj = json.loads(payload)
        except UnicodeDecodeError as e:
            raise _Undecodable(f"byte {e.start}") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: {unit} {loc} is not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: {unit} {loc} is not a JSON object; expected {{\"{text_key}\": ...}}")
        try:
            text = _field(obj, text_key)
        except KeyError:
            fields = ", ".join(list(obj)[:8])
            raise DataError(f"{path}: {unit} {loc} has no field '{text_key}' (fields: {fields}); pass --text-key") from None
        kind = "jstr"
        payload = text
    if payload is None:
        return None
    if not isinstance(payload, str):
        raise DataError(f"{path}: {unit} {loc}: field '{text_key}' is {type(payload).__name__}, not text")
    if kind == "jstr":
        # JSON escapes (or surrogateescape'd bytes) can produce lone surrogates, which no
        # tokenizer accepts; they are this input's form of undecodable bytes.
        try:
            payload.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _Undecodable(f"lone surrogate at character {e.start}") from None
    return payload


# ----------------------------------------------------------------------------- outputs


class _ShardSet:
    """Training shards: PREFIX, or PREFIX_00000, PREFIX_00001, ... when split by size."""

    def __init__(self, prefix: str, dtype, max_bytes: int | None):
        self.prefix, self.dtype, self.max_bytes = prefix, np.dtype(dtype), max_bytes
        self.writers: list[IndexedDatasetWriter] = []
        self._new()

    def _new(self):
        if self.writers:
            self.writers[-1].close()  # full: on disk under its temporary name until commit
        name = self.prefix if self.max_bytes is None else f"{self.prefix}_{len(self.writers):05d}"
        self.writers.append(IndexedDatasetWriter(name, self.dtype))

    def add(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        if self.max_bytes is None:
            self.writers[-1].add_documents(tokens, sizes)
            return
        item = self.dtype.itemsize
        ends = np.cumsum(sizes) * item  # byte end of each document within this batch
        done_docs, done_bytes = 0, 0
        while done_docs < len(sizes):
            w = self.writers[-1]
            room = self.max_bytes - w.num_bytes
            # documents that still fit entirely in the current shard
            k = int(np.searchsorted(ends[done_docs:] - done_bytes, room, side="right"))
            if k == 0:
                if w.num_documents:
                    self._new()
                    continue
                k = 1  # a single document larger than a shard gets a shard of its own
            end_bytes = int(ends[done_docs + k - 1])
            w.add_documents(
                tokens[done_bytes // item : end_bytes // item], sizes[done_docs : done_docs + k]
            )
            done_docs += k
            done_bytes = end_bytes

    @property
    def num_documents(self):
        return sum(w.num_documents for w in self.writers)

    @property
    def num_tokens(self):
        return sum(w.num_tokens for w in self.writers)


def _family(prefix: str) -> list[Path]:
    """Existing files that a prepare run with this --output writes (to replace stale ones)."""
    p = Path(prefix)
    if not p.parent.is_dir():
        return []
    pat = re.compile(re.escape(p.name) + r"(_\d{5,}|_valid)?\.(bin|idx)|" + re.escape(p.name) + r"\.json")
    return [q for q in p.parent.iterdir() if pat.fullmatch(q.name)]


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sidecar_path(prefix) -> str:
    return f"{prefix}.json"


def read_sidecar(prefix) -> dict | None:
    """The sidecar describing a prepared prefix (also found from PREFIX_00000 or PREFIX_valid,
    or from a directory of shards through its first shard); None when there is none."""
    from megacpt.data.indexed import list_shard_prefixes

    p = str(prefix)
    candidates = [p]
    if Path(p).is_dir():
        try:
            candidates = list_shard_prefixes(p)[:1]
        except DataError:
            return None
    for c in list(candidates):
        m = re.fullmatch(r"(.*)_(\d{5,}|valid)", c)
        if m:
            candidates.append(m.group(1))
    for c in candidates:
        sp = sidecar_path(c)
        if os.path.isfile(sp):
            try:
                with open(sp) as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                raise DataError(f"{sp}: unreadable sidecar ({e}); delete it or re-run megacpt prepare") from None
            if isinstance(data, dict) and data.get("format") == SIDECAR_FORMAT:
                return data
    return None


# ----------------------------------------------------------------------------- driver


@dataclass
class _Stats:
    records: int = 0
    undecodable: int = 0
    empty: int = 0
    per_source: list = field(default_factory=list)


def _valid_mask(record_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Record r is held out iff floor((r+1)F) > floor(rF): exactly floor(total*F) records, spread
    evenly, and a pure function of the global record number, so split runs agree with one run."""
    if fraction <= 0:
        return np.zeros(len(record_ids), dtype=bool)
    r = record_ids.astype(np.float64)
    return np.floor((r + 1) * fraction) > np.floor(r * fraction)


def _batches(sources: list[Source], stats: _Stats, counts=None, lo: int = 0, hi: int | None = None):
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


def _run_batches(batches, workers: int, spec: dict, opts: _Options):
    """Yield (batch first record, n records, result) in input order."""
    if workers <= 1:
        # --workers 1 means one core: keep the Rust tokenizer from starting its own thread pool
        # (it reads this variable at every batch call, so setting it here suffices).
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            encoder = _Encoder(spec)
            for batch, first in batches:
                yield first, len(batch[4]), _process(encoder, opts, batch)
        finally:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if getattr(mp.current_process(), "_inheriting", False):
        # We are a spawned worker re-running a script that calls prepare() at import time;
        # multiprocessing would fail obscurely (and the parent hang), so say what to do.
        raise UserError("prepare(workers > 1) must be called under `if __name__ == '__main__':`")
    # spawn, not fork: the parent may already run tokenizer/torch threads, and a forked child
    # inherits their locks; workers import only numpy + the tokenizer library, so spawn is cheap.
    # ProcessPoolExecutor (not Pool): a worker killed by the OOM killer fails the run instead of
    # hanging it.
    import pickle
    import tempfile

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
        if finished:
            ex.shutdown(wait=True)
        else:
            # Error or Ctrl-C: the remaining results are worthless, so do not wait for them.
            procs = list((getattr(ex, "_processes", None) or {}).values())
            ex.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.join(timeout=5)
        os.remove(spec_file)


def _progress(total, enabled):
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, unit="doc", unit_scale=True, disable=not enabled, dynamic_ncols=True)


def prepare(
    inputs,
    tokenizer: str,
    output: str,
    *,
    text_key: str = "text",
    text_mode: str = "file",
    workers: int = 1,
    max_shard_size=None,
    bos: bool = False,
    eos: bool = True,
    valid_fraction: float = 0.0,
    num_shards: int = 1,
    shard_index: int | None = None,
    on_decode_error: str = "error",
    progress: bool | None = None,
) -> dict:
    """Tokenize `inputs` into shards under `output`; returns the sidecar dict (also written)."""
    t0 = time.time()
    output = str(output)
    if text_mode not in ("file", "blocks", "lines"):
        raise UserError(f"--text-mode {text_mode}: use file, blocks or lines")
    if on_decode_error not in ("skip", "error"):
        raise UserError(f"--on-decode-error {on_decode_error}: use skip or error")
    if not 0 <= valid_fraction < 1:
        raise UserError(f"--valid-fraction {valid_fraction} must be in [0, 1)")
    if num_shards < 1:
        raise UserError(f"--num-shards {num_shards} must be >= 1")
    if shard_index is None:
        if num_shards > 1:
            raise UserError("--num-shards needs --shard-index (0-based)")
        shard_index = 0
    if not 0 <= shard_index < num_shards:
        raise DataError(f"--shard-index {shard_index} is out of range for --num-shards {num_shards} (0..{num_shards - 1})")
    if workers < 1:
        raise UserError(f"--workers {workers} must be >= 1")
    max_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
    if not output or output.endswith(("/", os.sep)) or Path(output).is_dir():
        raise UserError(f"--output {output} must be a file prefix (e.g. data/corpus), not a directory")

    sources = resolve_inputs(inputs, text_mode, text_key)
    tok = load_tokenizer(tokenizer)
    if eos and tok.eos_id is None:
        raise DataError(f"tokenizer {tokenizer} has no EOS token; use one that has, or pass --no-eos")
    if bos and tok.bos_id is None:
        raise DataError(f"tokenizer {tokenizer} has no BOS token; drop --bos")
    dtype = dtype_for_vocab(tok.vocab_size)

    # With --num-shards, count every input's records first to find this part's global range.
    counts, g_lo, g_hi, todo = None, 0, None, None
    if num_shards > 1:
        counts = [s.count() for s in sources]
        total = sum(counts)
        if total == 0:
            raise DataError("inputs hold no documents; check the --input files and --text-mode")
        g_lo, g_hi = total * shard_index // num_shards, total * (shard_index + 1) // num_shards
        todo = g_hi - g_lo

    opts = _Options(
        text_key=text_key,
        skip_undecodable=on_decode_error == "skip",
        bos_id=tok.bos_id if bos else None,
        eos_id=tok.eos_id if eos else None,
        dtype=dtype.name,
    )
    stats = _Stats()
    out_dir = Path(output).parent
    made_dir = not out_dir.exists()
    train: _ShardSet | None = None
    valid: IndexedDatasetWriter | None = None
    committed: list[str] = []
    results = None
    bar = _progress(todo, progress)
    try:
        train = _ShardSet(output, dtype, max_bytes)
        valid = IndexedDatasetWriter(f"{output}_valid", dtype) if valid_fraction > 0 else None
        results = _run_batches(_batches(sources, stats, counts, g_lo, g_hi), workers, tok.spec, opts)
        tokens_seen = 0
        last_post = 0.0
        for first, n, (tokens, sizes, undecodable, empty) in results:
            stats.undecodable += undecodable
            stats.empty += empty
            keep = sizes >= 0
            is_valid = _valid_mask(np.arange(first, first + n, dtype=np.int64), valid_fraction) & keep
            if valid is not None and is_valid.any():
                # Route tokens by document: expand the per-record flag to a per-token mask.
                token_valid = np.repeat(is_valid[keep], sizes[keep])
                valid.add_documents(tokens[token_valid], sizes[is_valid])
                train.add(tokens[~token_valid], sizes[keep & ~is_valid])
            else:
                train.add(tokens, sizes[keep])
            tokens_seen += tokens.size
            bar.update(n)
            now = time.time()
            if now - last_post > 0.5:
                bar.set_postfix(tok_s=f"{tokens_seen / max(now - t0, 1e-9):,.0f}", refresh=False)
                last_post = now
        bar.close()

        produced = train.num_documents + (valid.num_documents if valid else 0)
        if num_shards == 1 and stats.records == 0:
            raise DataError("inputs hold no documents; check the --input files and --text-mode")
        if num_shards == 1 and produced == 0:
            raise DataError(
                f"no documents left ({stats.empty} empty, {stats.undecodable} undecodable records); check --text-key"
            )
        if produced == 0:
            print(f"warning: shard {shard_index}/{num_shards} holds no documents", file=sys.stderr)

        sidecar = {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "tokenizer": tok.identity(),
            # Top-level copies for quick checks (the trainer's vocab check reads "vocab_size").
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
            "dtype": dtype.name,
            "bos": bool(bos),
            "eos": bool(eos),
            "documents": train.num_documents,
            "tokens": train.num_tokens,
            "shards": [
                {"prefix": Path(w.prefix).name, "documents": w.num_documents, "tokens": w.num_tokens}
                for w in train.writers
            ],
            "valid": None
            if valid is None
            else {"prefix": Path(valid.prefix).name, "documents": valid.num_documents, "tokens": valid.num_tokens},
            "valid_fraction": valid_fraction,
            "records": stats.records,
            "skipped": {"empty": stats.empty, "undecodable": stats.undecodable},
            "sources": stats.per_source,
            "text_key": text_key,
            "text_mode": text_mode,
            "num_shards": num_shards,
            "shard_index": shard_index,
            "created_by": _created_by(),
            "seconds": round(time.time() - t0, 3),
        }

        for w in train.writers:
            w.close()
        if valid is not None:
            valid.close()
        writers = train.writers + ([valid] if valid is not None else [])
        new_files = {os.path.abspath(f(w.prefix)) for w in writers for f in (bin_path, idx_path)}
        new_files.add(os.path.abspath(sidecar_path(output)))
        stale = [q for q in _family(output) if os.path.abspath(q) not in new_files]
        for w in writers:
            w.commit()
            committed += [bin_path(w.prefix), idx_path(w.prefix)]
        _write_json_atomic(sidecar_path(output), sidecar)
        # Leftovers of an earlier run with this prefix (e.g. more size-split shards) would be
        # picked up by a directory glob and silently mixed in: the prefix now means this run only.
        for q in stale:
            q.unlink(missing_ok=True)
        return sidecar
    except BaseException:
        bar.close()
        if results is not None:
            results.close()  # stops the worker pool now, not when the traceback is collected
        if train is not None:
            for w in train.writers:
                w.abort()
        if valid is not None:
            valid.abort()
        for p in committed:  # an interruption while renaming: take back what was renamed
            Path(p).unlink(missing_ok=True)
        if made_dir:
            try:
                out_dir.rmdir()
            except OSError:
                pass
        raise


def _created_by() -> str:
    from megacpt import __version__

    return f"megacpt {__version__}"


# ----------------------------------------------------------------------------- CLI


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def register(subparsers) -> None:
    from megacpt.cli import add_common

    p = subparsers.add_parser(
        "prepare",
        help="tokenize text into Megatron .bin/.idx shards",
        description=(
            "Tokenize .txt, .jsonl, .json, .parquet files or save_to_disk dataset directories into "
            "PREFIX.bin/.idx (+ PREFIX.json sidecar). Each record becomes one document followed by "
            "EOS. Output appears atomically; files of an earlier run with the same PREFIX are replaced."
        ),
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, directories of files, or save_to_disk dirs (in this order)")
    p.add_argument("--tokenizer", required=True, metavar="DIR_OR_MODEL", help="HF tokenizer dir/hub id or sentencepiece .model")
    p.add_argument("--output", required=True, metavar="PREFIX", help="output prefix, e.g. data/corpus")
    p.add_argument("--text-key", default="text", help="JSON field / column holding the text (dotted for nested JSON; default: text)")
    p.add_argument(
        "--text-mode",
        choices=["file", "blocks", "lines"],
        default="file",
        help="plain text: one document per file (default), per blank-line separated block, or per line",
    )
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: usable CPU cores)")
    p.add_argument("--max-shard-size", default=None, metavar="SIZE", help="split output into PREFIX_00000... of at most SIZE bytes of .bin (e.g. 100MB, 1GiB)")
    p.add_argument("--bos", action="store_true", help="prepend BOS to every document")
    p.add_argument("--no-eos", action="store_true", help="do not append EOS (default: append)")
    p.add_argument("--valid-fraction", type=float, default=0.0, metavar="F", help="hold out this fraction of documents into PREFIX_valid")
    p.add_argument("--num-shards", type=int, default=1, metavar="N", help="split the input documents into N contiguous parts (with --shard-index)")
    p.add_argument("--shard-index", type=int, default=None, metavar="I", help="which part to process (0-based; e.g. $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--on-decode-error", choices=["skip", "error"], default="error", help="records that are not valid UTF-8: skip (counted in the sidecar) or stop (default)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: when stderr is a terminal)")
    add_common(p)
    p.set_defaults(func=_cmd_prepare)

    from megacpt.data import merge

    merge.register(subparsers)


def _cmd_prepare(args) -> int:
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

"""Input formats for `megacpt prepare`: which files an --input names, and the records each holds.

A *record* is one unit read from an input: a line of JSON Lines, an element of a JSON array, a
row of Parquet or of a `save_to_disk` dataset, and for plain text a file, a blank-line separated
block or a line (`--text-mode`). The main process only enumerates records (cheaply: raw bytes or
raw JSON lines); `to_text` turns a record's payload into its text inside the worker processes.

Counting uses the same generators as reading, so the two agree on what a record is: free for
Parquet and `save_to_disk` (metadata), a byte scan of lines for text and JSON Lines (no decoding,
no JSON parsing), a parse for JSON arrays.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from megacpt.errors import DataError, UserError

# One document above this is almost surely a wrong --text-mode (a whole corpus as one "file"
# document); tokenizing it would take many GB of memory for offsets and token strings.
MAX_DOC_BYTES = 128 << 20
# Arrow rows turned into Python strings at a time (Parquet, save_to_disk): bounds the reader's memory.
ARROW_ROWS = 1024

TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
JSON_SUFFIXES = {".json"}
PARQUET_SUFFIXES = {".parquet", ".pq"}


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


class Undecodable(Exception):
    """A record that is not valid text (bad UTF-8, lone surrogates): --on-decode-error decides."""


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
            import pyarrow.parquet as pq  # optional and heavy: only for Parquet inputs

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
            import pyarrow.parquet as pq  # optional and heavy: only for Parquet inputs

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
        import pyarrow as pa  # optional and heavy: only for Arrow inputs

        t = schema.field(self.text_key).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise DataError(f"{self.path}: column '{self.text_key}' is {t}, not text; pass --text-key")

    def _parquet(self, start: int, stop: int | None):
        import pyarrow.parquet as pq  # optional and heavy: only for Parquet inputs

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
            for batch in pf.iter_batches(batch_size=ARROW_ROWS, row_groups=[rg], columns=[self.text_key]):
                for text in batch.column(0).to_pylist():
                    if start <= row < stop:
                        yield (row, text, "str")
                    row += 1

    def _open_dataset(self):
        if not hasattr(self, "_ds"):
            import datasets  # optional and heavy: only for save_to_disk inputs

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
        for i in range(start, stop, ARROW_ROWS):
            table = ds[i : min(i + ARROW_ROWS, stop)]
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


def to_text(kind: str, payload, text_key: str, path: str, unit: str, loc) -> str | None:
    """A record's text from its payload (see Source), None for a null text; raises Undecodable."""
    if kind == "bytes":
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Undecodable(f"byte {e.start}") from None
    if kind == "jsonl":
        try:
            obj = json.loads(payload)
        except UnicodeDecodeError as e:
            raise Undecodable(f"byte {e.start}") from None
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
            raise Undecodable(f"lone surrogate at character {e.start}") from None
    return payload

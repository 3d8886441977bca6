"""`megacpt prepare` / `megacpt merge`: tokens, formats, ordering, splitting, errors, atomicity."""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from conftest_data import big_vocab_tokenizer_dir, hf_tokenizer_dir, make_docs, sp_model  # noqa: F401 (fixtures)
from megacpt import cli
from megacpt.data import prepare as P
from megacpt.data import readers as R
from megacpt.data import sidecar as S
from megacpt.data import workers as W
from megacpt.data.indexed import IndexedDataset, list_shard_prefixes
from megacpt.errors import DataError

# ----------------------------------------------------------------------------- helpers


def run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def read_docs(prefix) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def raw(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def hf_expected(tok_dir, docs, bos=False, eos=True):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    out = []
    for d in docs:
        ids = tok(d, add_special_tokens=False)["input_ids"]
        out.append(([tok.bos_token_id] if bos else []) + ids + ([tok.eos_token_id] if eos else []))
    return out


def sp_expected(model, docs):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    return [sp.encode(d) + [sp.eos_id()] for d in docs]


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, key: d}, ensure_ascii=i % 2 == 0) + "\n")
    return str(path)


def write_input(tmp: Path, docs: list[str], fmt: str) -> tuple[list[str], list[str]]:
    """Write docs in one input format; returns (input paths, extra CLI args)."""
    tmp.mkdir(parents=True, exist_ok=True)
    if fmt == "txt-file":
        paths = []
        for i, d in enumerate(docs):
            p = tmp / f"doc{i:03d}.txt"
            p.write_bytes(d.encode())
            paths.append(str(p))
        return paths, ["--text-mode", "file"]
    if fmt == "txt-dir":  # a directory expands to its files, sorted
        for i, d in enumerate(docs):
            (tmp / f"doc{i:03d}.txt").write_bytes(d.encode())
        return [str(tmp)], []
    if fmt == "txt-blocks":
        p = tmp / "blocks.txt"
        p.write_bytes(("\n\n\n".join(docs) + "\n").replace("\n\n\n", "\n\n", len(docs) // 2).encode())
        return [str(p)], ["--text-mode", "blocks"]
    if fmt == "txt-lines":
        p = tmp / "lines.txt"
        p.write_bytes("\n".join(docs).encode() + b"\n\n")
        return [str(p)], ["--text-mode", "lines"]
    if fmt == "jsonl":
        return [write_jsonl(tmp / "a.jsonl", docs)], []
    if fmt == "jsonl-gz":
        p = tmp / "a.jsonl.gz"
        with gzip.open(p, "wt", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n\n")
        return [str(p)], []
    if fmt == "json-array":
        p = tmp / "a.json"
        p.write_text(json.dumps([{"meta": 1, "text": d} for d in docs], indent=1), encoding="utf-8")
        return [str(p)], []
    if fmt == "json-lines":  # JSON Lines under a .json name, as Dataset.to_json writes
        return [write_jsonl(tmp / "a.json", docs)], []
    if fmt == "json-nested":
        p = tmp / "n.jsonl"
        p.write_text("".join(json.dumps({"meta": {"body": d}}) + "\n" for d in docs), encoding="utf-8")
        return [str(p)], ["--text-key", "meta.body"]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp / "a.parquet"
        pq.write_table(pa.table({"id": list(range(len(docs))), "content": docs}), p, row_group_size=7)
        return [str(p)], ["--text-key", "content"]
    if fmt == "save_to_disk":
        import datasets

        d = tmp / "ds"
        datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))}).save_to_disk(str(d))
        return [str(d)], []
    raise ValueError(fmt)


def files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


DOCS = make_docs(40, seed=5)
FLAT_DOCS = make_docs(40, seed=6, newlines=False)  # for one-document-per-line input


# ----------------------------------------------------------------------------- tokens


FORMATS = [
    "txt-file", "txt-dir", "txt-blocks", "txt-lines", "jsonl", "jsonl-gz", "json-array",
    "json-lines", "json-nested", "parquet", "save_to_disk",
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_hf_tokens_equal_tokenizer_encoding(tmp_path, hf_tokenizer_dir, fmt):
    docs = FLAT_DOCS if fmt == "txt-lines" else DOCS
    inputs, extra = write_input(tmp_path / "in", docs, fmt)
    out = tmp_path / "out" / "corpus"
    assert run("prepare", "--input", *inputs, "--tokenizer", hf_tokenizer_dir, "--output", out, "--workers", 1, *extra) == 0
    assert read_docs(out) == hf_expected(hf_tokenizer_dir, docs)
    sc = S.read_sidecar(out)
    assert sc["documents"] == len(docs) and sc["records"] == len(docs)
    assert sc["tokens"] == sum(map(len, hf_expected(hf_tokenizer_dir, docs)))
    assert sc["dtype"] == "uint16"
    assert files_under(tmp_path / "out") == ["corpus.bin", "corpus.idx", "corpus.json"]


@pytest.mark.parametrize("fmt", ["txt-blocks", "jsonl", "json-array", "parquet", "save_to_disk"])
def test_sentencepiece_tokens_equal_tokenizer_encoding(tmp_path, sp_model, fmt):
    inputs, extra = write_input(tmp_path / "in", DOCS, fmt)
    out = tmp_path / "sp"
    assert run("prepare", "--input", *inputs, "--tokenizer", sp_model, "--output", out, "--workers", 1, *extra) == 0
    assert read_docs(out) == sp_expected(sp_model, DOCS)
    sc = S.read_sidecar(out)
    assert sc["tokenizer"]["kind"] == "sentencepiece" and sc["tokenizer"]["eos_id"] == 2


def test_several_inputs_keep_order_and_bos_no_eos(tmp_path, hf_tokenizer_dir):
    a, b, c = DOCS[:10], DOCS[10:25], DOCS[25:]
    inputs = (
        write_input(tmp_path / "z", a, "save_to_disk")[0]  # order of --input, not of names
        + [write_jsonl(tmp_path / "b.jsonl", b)]
        + write_input(tmp_path / "a", c, "txt-file")[0]
    )
    out = tmp_path / "o"
    rc = run("prepare", "--input", *inputs, "--tokenizer", hf_tokenizer_dir, "--output", out,
             "--workers", 1, "--bos", "--no-eos")
    assert rc == 0
    assert read_docs(out) == hf_expected(hf_tokenizer_dir, a + b + c, bos=True, eos=False)
    sc = S.read_sidecar(out)
    assert [s["records"] for s in sc["sources"]] == [10, 15] + [1] * len(c)
    assert sc["bos"] is True and sc["eos"] is False


def test_missing_column_is_checked_before_any_work(tmp_path, hf_tokenizer_dir, capsys):
    inputs, _ = write_input(tmp_path / "p", DOCS, "parquet")  # column "content", not "text"
    assert run("prepare", "--input", *inputs, "--tokenizer", hf_tokenizer_dir, "--output", tmp_path / "out" / "o") == 2
    assert "no column 'text' (columns: id, content); pass --text-key" in capsys.readouterr().err
    assert files_under(tmp_path / "out") == []


def test_big_vocab_uses_int32(tmp_path, big_vocab_tokenizer_dir):
    docs = ["the model w69999 data", "w123 w65600 of"]
    out = tmp_path / "big"
    assert run("prepare", "--input", write_jsonl(tmp_path / "a.jsonl", docs), "--tokenizer",
               big_vocab_tokenizer_dir, "--output", out, "--workers", 1) == 0
    ds = IndexedDataset(out)
    assert ds.dtype == np.int32
    assert read_docs(out) == hf_expected(big_vocab_tokenizer_dir, docs)
    assert 69999 in read_docs(out)[0]


def test_empty_records_are_skipped_and_counted(tmp_path, hf_tokenizer_dir):
    p = tmp_path / "e.jsonl"
    p.write_text('{"text": "a b"}\n{"text": ""}\n{"text": null}\n   \n{"text": "c"}\n')
    out = tmp_path / "e"
    assert run("prepare", "--input", p, "--tokenizer", hf_tokenizer_dir, "--output", out, "--workers", 1) == 0
    assert read_docs(out) == hf_expected(hf_tokenizer_dir, ["a b", "c"])
    assert S.read_sidecar(out)["skipped"] == {"empty": 2, "undecodable": 0}


# ----------------------------------------------------------------------------- ordering, splitting


def mixed_inputs(tmp: Path, n_jsonl=45, n_lines=30, n_parquet=25):
    """Three inputs of different kinds; documents of the big ones straddle split boundaries."""
    docs = make_docs(n_jsonl + n_lines + n_parquet, seed=11, newlines=False)
    a, b, c = docs[:n_jsonl], docs[n_jsonl : n_jsonl + n_lines], docs[n_jsonl + n_lines :]
    paths = [write_jsonl(tmp / "a.jsonl", a)]
    (tmp / "b.txt").write_text("\n".join(b) + "\n", encoding="utf-8")
    paths.append(str(tmp / "b.txt"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": c}), tmp / "c.parquet", row_group_size=4)
    paths.append(str(tmp / "c.parquet"))
    return paths, docs


def test_workers_do_not_change_bytes(tmp_path, hf_tokenizer_dir, monkeypatch):
    monkeypatch.setattr(W, "BATCH_DOCS", 4)  # many small batches: order must be restored
    monkeypatch.setattr(R, "ARROW_ROWS", 4)
    inputs, docs = mixed_inputs(tmp_path)
    common = ["--input", *inputs, "--tokenizer", hf_tokenizer_dir, "--text-mode", "lines", "--valid-fraction", "0.1"]
    assert run("prepare", *common, "--output", tmp_path / "w1", "--workers", 1) == 0
    assert run("prepare", *common, "--output", tmp_path / "w2", "--workers", 2) == 0
    assert raw(tmp_path / "w1") == raw(tmp_path / "w2")
    assert raw(tmp_path / "w1_valid") == raw(tmp_path / "w2_valid")


@pytest.mark.parametrize("num_shards", [3, 7])
def test_split_then_merge_is_byte_identical(tmp_path, hf_tokenizer_dir, monkeypatch, num_shards):
    monkeypatch.setattr(W, "BATCH_DOCS", 5)
    monkeypatch.setattr(R, "ARROW_ROWS", 5)
    inputs, docs = mixed_inputs(tmp_path) if num_shards == 3 else mixed_inputs(tmp_path, 2, 1, 2)
    common = ["--input", *inputs, "--tokenizer", hf_tokenizer_dir, "--text-mode", "lines",
              "--workers", 1, "--valid-fraction", "0.1"]
    assert run("prepare", *common, "--output", tmp_path / "whole") == 0
    parts = []
    for i in range(num_shards):
        assert run("prepare", *common, "--output", tmp_path / f"part{i}", "--num-shards", num_shards, "--shard-index", i) == 0
        parts.append(tmp_path / f"part{i}")
    # contiguous, document-aligned parts of (nearly) equal size
    counts = [S.read_sidecar(p)["records"] for p in parts]
    assert sum(counts) == len(docs) and max(counts) - min(counts) <= 1
    assert run("merge", *parts, "--output", tmp_path / "merged") == 0
    assert raw(tmp_path / "merged") == raw(tmp_path / "whole")
    assert run("merge", *[f"{p}_valid" for p in parts], "--output", tmp_path / "merged_valid") == 0
    assert raw(tmp_path / "merged_valid") == raw(tmp_path / "whole_valid")
    sc = S.read_sidecar(tmp_path / "merged")
    assert sc["documents"] == S.read_sidecar(tmp_path / "whole")["documents"]
    assert sc["tokenizer"]["vocab_hash"] == S.read_sidecar(tmp_path / "whole")["tokenizer"]["vocab_hash"]


def test_max_shard_size(tmp_path, hf_tokenizer_dir):
    inputs, _ = write_input(tmp_path / "in", DOCS, "jsonl")
    common = ["--input", *inputs, "--tokenizer", hf_tokenizer_dir, "--workers", 1]
    assert run("prepare", *common, "--output", tmp_path / "whole") == 0
    assert run("prepare", *common, "--output", tmp_path / "s" / "c", "--max-shard-size", "200B") == 0
    parts = list_shard_prefixes(tmp_path / "s" / "c")
    assert len(parts) > 3 and parts[0].endswith("c_00000")
    for p in parts:
        ds = IndexedDataset(p)
        assert os.path.getsize(f"{p}.bin") <= 200 or len(ds) == 1  # an oversized doc sits alone
        assert len(ds) >= 1
    # every shard full: the next document would not have fitted
    for p, nxt in zip(parts, parts[1:]):
        assert os.path.getsize(f"{p}.bin") + 2 * int(IndexedDataset(nxt).sizes[0]) > 200
    assert sum((read_docs(p) for p in parts), []) == read_docs(tmp_path / "whole")
    sc = S.read_sidecar(tmp_path / "s" / "c")
    assert [s["prefix"] for s in sc["shards"]] == [Path(p).name for p in parts]
    assert S.read_sidecar(parts[1]) == sc
    # a size-split prefix merges back into the unsplit bytes
    assert run("merge", tmp_path / "s" / "c", "--output", tmp_path / "m") == 0
    assert raw(tmp_path / "m") == raw(tmp_path / "whole")


def test_valid_fraction(tmp_path, hf_tokenizer_dir):
    inputs, _ = write_input(tmp_path / "in", DOCS, "jsonl")
    out = tmp_path / "v"
    assert run("prepare", "--input", *inputs, "--tokenizer", hf_tokenizer_dir, "--output", out,
               "--workers", 1, "--valid-fraction", "0.25") == 0
    expected = hf_expected(hf_tokenizer_dir, DOCS)
    held = [r for r in range(len(DOCS)) if math.floor((r + 1) * 0.25) > math.floor(r * 0.25)]
    assert len(held) == 10
    assert read_docs(f"{out}_valid") == [expected[r] for r in held]
    assert read_docs(out) == [e for r, e in enumerate(expected) if r not in held]
    sc = S.read_sidecar(out)
    assert sc["valid"]["documents"] == 10 and sc["documents"] == 30
    assert S.read_sidecar(f"{out}_valid") == sc


def test_rerun_replaces_stale_outputs(tmp_path, hf_tokenizer_dir):
    inputs, _ = write_input(tmp_path / "in", DOCS, "jsonl")
    common = ["--input", *inputs, "--tokenizer", hf_tokenizer_dir, "--workers", 1, "--output", tmp_path / "o" / "c"]
    assert run("prepare", *common, "--max-shard-size", "300", "--valid-fraction", "0.1") == 0
    assert len(files_under(tmp_path / "o")) > 6
    (tmp_path / "o" / "other.bin").write_bytes(b"")  # not ours: must survive
    assert run("prepare", *common) == 0
    assert files_under(tmp_path / "o") == ["c.bin", "c.idx", "c.json", "other.bin"]


def test_merge_directory_and_sidecar(tmp_path, hf_tokenizer_dir):
    inputs, _ = write_input(tmp_path / "in", DOCS, "jsonl")
    for i in range(2):
        assert run("prepare", "--input", *inputs, "--tokenizer", hf_tokenizer_dir, "--workers", 1,
                   "--output", tmp_path / "d" / f"p{i}", "--num-shards", 2, "--shard-index", i) == 0
    assert run("merge", tmp_path / "d", "--output", tmp_path / "m") == 0
    assert read_docs(tmp_path / "m") == hf_expected(hf_tokenizer_dir, DOCS)
    sc = S.read_sidecar(tmp_path / "m")
    assert sc["documents"] == len(DOCS) and sc["vocab_size"] == S.read_sidecar(tmp_path / "d" / "p0")["vocab_size"]
    assert len(sc["merged_from"]) == 2


# ----------------------------------------------------------------------------- errors


def bad_case(tmp: Path, case: str, hf_dir: str):
    """(argv, expected words in the message) of one bad-input case."""
    good = write_jsonl(tmp / "good.jsonl", DOCS[:5])
    out = tmp / "out" / "c"
    base = ["--tokenizer", hf_dir, "--output", out, "--workers", 1]
    if case == "empty":
        (tmp / "empty.jsonl").write_text("\n  \n")
        return ["prepare", "--input", tmp / "empty.jsonl", *base], "no documents"
    if case == "missing-input":
        return ["prepare", "--input", good, tmp / "nope.jsonl", *base], "does not exist"
    if case == "missing-field":
        p = tmp / "f.jsonl"
        p.write_text('{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n')
        return ["prepare", "--input", good, p, *base], "f.jsonl: line 3 has no field 'text'"
    if case == "bad-json":
        p = tmp / "j.jsonl"
        p.write_text('{"text": "a"}\n{"text": "b"\n')
        return ["prepare", "--input", p, *base], "line 2 is not valid JSON"
    if case == "undecodable":
        p = tmp / "u.txt"
        p.write_bytes(b"fine line\nbad \xff\xfe line\nok\n")
        return ["prepare", "--input", p, "--text-mode", "lines", *base], "line 2 is not valid UTF-8"
    if case == "undecodable-jsonl":
        p = tmp / "u.jsonl"
        p.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff"}\n')
        return ["prepare", "--input", p, *base], "--on-decode-error skip"
    if case == "unknown-tokenizer":
        return ["prepare", "--input", good, "--tokenizer", tmp / "no_tok", "--output", out], "tokenizer"
    if case == "not-a-tokenizer":
        (tmp / "empty_dir").mkdir()
        return ["prepare", "--input", good, "--tokenizer", tmp / "empty_dir", "--output", out], "cannot load tokenizer"
    if case == "shard-index":
        return ["prepare", "--input", good, *base, "--num-shards", 3, "--shard-index", 3], "out of range"
    if case == "unknown-type":
        (tmp / "x.csv").write_text("a,b\n")
        return ["prepare", "--input", tmp / "x.csv", *base], "unknown file type"
    if case == "bad-size":
        return ["prepare", "--input", good, *base, "--max-shard-size", "lots"], "cannot parse size"
    if case == "merge-missing":
        return ["merge", tmp / "nothing", "--output", out], "no "
    raise ValueError(case)


@pytest.mark.parametrize(
    "case",
    ["empty", "missing-input", "missing-field", "bad-json", "undecodable", "undecodable-jsonl",
     "unknown-tokenizer", "not-a-tokenizer", "shard-index", "unknown-type", "bad-size", "merge-missing"],
)
def test_bad_input_exit_2_and_no_output(tmp_path, hf_tokenizer_dir, capsys, case):
    argv, words = bad_case(tmp_path, case, hf_tokenizer_dir)
    capsys.readouterr()
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert files_under(tmp_path / "out") == []


def test_error_after_shards_were_written_leaves_nothing(tmp_path, hf_tokenizer_dir, monkeypatch):
    monkeypatch.setattr(W, "BATCH_DOCS", 3)
    p = tmp_path / "late.jsonl"
    write_jsonl(p, DOCS)
    with open(p, "a") as f:
        f.write('{"body": "no text here"}\n')
    with pytest.raises(DataError, match=f"line {len(DOCS) + 1}"):
        P.prepare([str(p)], hf_tokenizer_dir, str(tmp_path / "out" / "c"), max_shard_size=100, valid_fraction=0.2)
    assert files_under(tmp_path / "out") == []


def test_ctrl_c_leaves_nothing(tmp_path, hf_tokenizer_dir, monkeypatch, capsys):
    monkeypatch.setattr(W, "BATCH_DOCS", 3)
    real = W._process
    calls = []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(W, "_process", interrupted)
    inputs, _ = write_input(tmp_path / "in", DOCS, "jsonl")
    rc = run("prepare", "--input", *inputs, "--tokenizer", hf_tokenizer_dir, "--output", tmp_path / "out" / "c",
             "--workers", 1, "--max-shard-size", 100)
    assert rc == 130 and len(calls) == 4
    assert files_under(tmp_path / "out") == []


def test_worker_error_with_two_workers(tmp_path, hf_tokenizer_dir, capsys):
    p = tmp_path / "f.jsonl"
    p.write_text('{"text": "a"}\n' * 50 + '{"nope": 1}\n')
    assert run("prepare", "--input", p, "--tokenizer", hf_tokenizer_dir, "--output", tmp_path / "out" / "c", "--workers", 2) == 2
    assert "line 51 has no field 'text'" in capsys.readouterr().err
    assert files_under(tmp_path / "out") == []


def test_undecodable_skip_counts(tmp_path, hf_tokenizer_dir):
    p = tmp_path / "u.txt"
    p.write_bytes(b"fine line\nbad \xff line\n\nok\n")
    j = tmp_path / "u.jsonl"
    j.write_bytes(b'{"text": "bad \xff"}\n{"text": "lone \\ud800 surrogate"}\n{"text": "good"}\n')
    out = tmp_path / "s"
    assert run("prepare", "--input", p, j, "--tokenizer", hf_tokenizer_dir, "--output", out, "--workers", 1,
               "--text-mode", "lines", "--on-decode-error", "skip") == 0
    assert read_docs(out) == hf_expected(hf_tokenizer_dir, ["fine line", "ok", "good"])
    assert S.read_sidecar(out)["skipped"]["undecodable"] == 3


def test_merge_refuses_mismatched_dtype_and_tokenizer(tmp_path, hf_tokenizer_dir, big_vocab_tokenizer_dir, sp_model, capsys):
    good = write_jsonl(tmp_path / "g.jsonl", ["the model", "of data"])
    for name, tok in [("a", hf_tokenizer_dir), ("b", big_vocab_tokenizer_dir), ("c", sp_model)]:
        assert run("prepare", "--input", good, "--tokenizer", tok, "--output", tmp_path / name, "--workers", 1) == 0
    capsys.readouterr()
    assert run("merge", tmp_path / "a", tmp_path / "b", "--output", tmp_path / "out" / "m") == 2
    assert "int32" in capsys.readouterr().err
    assert run("merge", tmp_path / "a", tmp_path / "c", "--output", tmp_path / "out" / "m") == 2
    assert "different vocabularies" in capsys.readouterr().err
    assert run("merge", tmp_path / "a", "--output", tmp_path / "a") == 2
    assert files_under(tmp_path / "out") == []


# ----------------------------------------------------------------------------- pieces


def test_json_array_parser_across_chunks(tmp_path):
    items = [{"text": d, "nested": {"x": [1, 2, {"y": "]"}]}} for d in make_docs(30, seed=9)] + [{"text": "x" * 50}]
    p = tmp_path / "a.json"
    p.write_text(" \n[ " + " ,\n".join(json.dumps(x, ensure_ascii=False) for x in items) + "\n]\n", encoding="utf-8")
    assert list(R._iter_json_array(str(p), chunk=7)) == items
    (tmp_path / "e.json").write_text("[]")
    assert list(R._iter_json_array(str(tmp_path / "e.json"))) == []
    (tmp_path / "t.json").write_text('[{"text": "a"}, {"text": "b"')
    with pytest.raises(DataError, match="truncated|invalid JSON"):
        list(R._iter_json_array(str(tmp_path / "t.json"), chunk=5))


def test_count_matches_records(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfa\nb\n\n\n c\n\nd\n")
    for mode, n in [("file", 1), ("blocks", 3), ("lines", 4)]:
        src = R.Source(str(tmp_path / "b.txt"), "text", mode)
        recs = list(src.records())
        assert src.count() == len(recs) == n
    assert list(R.Source(str(tmp_path / "b.txt"), "text", "blocks").records())[0][1] == b"a\nb"
    assert [r[0] for r in R.Source(str(tmp_path / "b.txt"), "text", "lines").records(1, 3)] == [2, 5]


def test_parse_size():
    assert P.parse_size("100MB") == 100_000_000
    assert P.parse_size("1GiB") == 2**30
    assert P.parse_size("4096") == 4096
    assert P.parse_size("1.5k") == 1500


def test_read_sidecar_missing(tmp_path):
    assert S.read_sidecar(tmp_path / "nothing") is None

"""`megacpt contamination` (megacpt/eval/contamination.py): n-gram overlap of eval items with
training shards, checked against a brute-force reference built from Python tuples here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from conftest_data import hf_tokenizer_dir  # noqa: F401 (fixture)
from megacpt.cli import main
from megacpt.data.indexed import IndexedDataset, IndexedDatasetWriter, list_shard_prefixes
from megacpt.eval import contamination as C

N = 13


def write_shard(prefix, docs, dtype=np.uint16) -> str:
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(np.asarray(d))
    return str(prefix)


def reference(train: dict, items: list, n: int) -> dict:
    """{source: (contaminated item ids, covered tokens per item)} by brute force: every n-gram of
    every shard's token stream (documents concatenated, as the trainer packs them) as a tuple;
    an item's fields are a list of token lists."""
    out = {}
    for name, path in train.items():
        grams = set()
        for prefix in list_shard_prefixes(path):
            toks = IndexedDataset(prefix).all_tokens.tolist()
            grams.update(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
        ids, covered = set(), []
        for k, fields in enumerate(items):
            cov = 0
            for f in fields:
                f = list(f)
                mark = [False] * len(f)
                for i in range(len(f) - n + 1):
                    if tuple(f[i : i + n]) in grams:
                        ids.add(k)
                        mark[i : i + n] = [True] * n
                cov += sum(mark)
            covered.append(cov)
        out[name] = (ids, covered)
    return out


def all_ids(report: dict, set_name: str, source: str) -> set:
    return set(report["eval"][set_name]["sources"][source]["contaminated_ids"])


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """60 eval items (vocab 0..999, 13..80 tokens, one 5-token short item) and two sources of
    vocab 1000..1999: `planted` holds whole copies of K items and a 13-token slice of another,
    `clean` none. Disjoint vocabularies: no overlap other than what was planted."""
    tmp = tmp_path_factory.mktemp("contam")
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 1000, int(rng.integers(N, 80))) for _ in range(60)]
    items[9] = rng.integers(0, 1000, 5)
    whole, sliced = [3, 17, 30, 44, 59], 21
    docs = [rng.integers(1000, 2000, int(rng.integers(50, 3000))) for _ in range(40)]
    for k, i in enumerate(whole):
        docs.insert(3 + 7 * k, items[i])
    docs.insert(20, items[sliced][2 : 2 + N])
    docs.insert(25, items[9])  # a short item, present in training: still not checkable
    train = {"planted": write_shard(tmp / "planted", docs), "clean": write_shard(tmp / "clean", docs[:2] + docs[-2:])}
    return {"tmp": tmp, "items": items, "train": train, "expected": {*whole, sliced}}


@pytest.mark.parametrize("exact", [False, True])
def test_planted_items_are_found_per_source(planted, exact):
    r = C.check(planted["train"], {"ev": planted["items"]}, ngram=N, exact=exact)
    s = r["eval"]["ev"]
    assert r["mode"] == ("exact" if exact else "hashed")
    assert (s["items"], s["short_items"], s["checked_items"]) == (60, 1, 59)
    assert all_ids(r, "ev", "planted") == planted["expected"] == set(s["any"]["contaminated_ids"])
    assert s["sources"]["planted"]["items"] == 6 and s["sources"]["planted"]["item_fraction"] == 6 / 59
    assert s["sources"]["clean"]["items"] == 0 and s["sources"]["clean"]["tokens"] == 0
    ref_ids, ref_cov = reference(planted["train"], [[x] for x in planted["items"]], N)["planted"]
    assert ref_ids == planted["expected"]
    assert s["sources"]["planted"]["tokens"] == sum(ref_cov) == sum(len(planted["items"][i]) for i in [3, 17, 30, 44, 59]) + N
    assert s["tokens"] == sum(len(x) for x in planted["items"])


def test_block_edges_and_workers(planted, monkeypatch):
    """Tiny blocks and tasks (n-grams cross every block edge), inline and in 2 worker processes,
    hashed and exact: the same result as large blocks and as the reference."""
    big = C.check(planted["train"], {"ev": planted["items"]}, ngram=N)
    monkeypatch.setattr(C, "BLOCK_TOKENS", 257)
    monkeypatch.setattr(C, "CHUNK_TOKENS", 1000)
    one = C.check(planted["train"], {"ev": planted["items"]}, ngram=N, workers=1)
    two = C.check(planted["train"], {"ev": planted["items"]}, ngram=N, workers=2)
    two_exact = C.check(planted["train"], {"ev": planted["items"]}, ngram=N, workers=2, exact=True)
    assert one["eval"] == two["eval"] == big["eval"]
    assert one["scanned_ngrams"] == two["scanned_ngrams"] == big["scanned_ngrams"]
    assert two_exact["eval"]["ev"]["sources"] == one["eval"]["ev"]["sources"]
    tasks, _ = C.plan_scan(planted["train"], None)
    assert len(tasks) > 10  # really split


def test_exact_agrees_with_hashed_on_partial_overlaps(tmp_path):
    """Training text spliced from pieces of eval items (some n tokens or longer, some shorter,
    across field ends), small vocabulary so many n-grams repeat: per-item sets and covered tokens
    of both modes equal the brute-force reference."""
    rng = np.random.default_rng(1)
    n = 4
    items = [[rng.integers(0, 12, int(rng.integers(1, 15))) for _ in range(int(rng.integers(1, 4)))] for _ in range(300)]
    docs = []
    for _ in range(200):
        f = items[int(rng.integers(0, 300))][0]
        a = int(rng.integers(0, len(f)))
        docs.append(np.concatenate([f[a : a + int(rng.integers(1, 8))], rng.integers(0, 12, int(rng.integers(0, 4)))]))
    train = {"a": write_shard(tmp_path / "a", docs[:100]), "b": write_shard(tmp_path / "b", docs[100:])}
    ref = reference(train, items, n)
    assert 0 < len(ref["a"][0]) < 300 and ref["a"][0] != ref["b"][0]
    for exact in (False, True):
        index = C.build_index([C.EvalSet("ev", "<t>", "tokens", items)], n, exact)
        tasks, stats = C.plan_scan(train, None)
        hits, scanned = C.scan(index.matcher, tasks, 2)
        r = C.build_report(index, dict(zip(train, hits)), stats, scanned, exact)
        for src in train:
            e = r["eval"]["ev"]["sources"][src]
            assert set(e["contaminated_ids"]) == ref[src][0], (exact, src)
            assert e["tokens"] == sum(ref[src][1]), (exact, src)


def test_empty_eval_set(planted):
    r = C.check(planted["train"], [("ev", [])], ngram=N)
    assert r["eval"]["ev"]["items"] == 0 and r["eval"]["ev"]["any"]["item_fraction"] is None


def test_disjoint_items_within_false_positive_bound(tmp_path):
    """1,200 items and 3M training tokens with no n-gram in common (disjoint vocabularies): the
    count of flagged items stays within the expected false positives + 3 sigma of the stated rate."""
    rng = np.random.default_rng(2)
    items = [rng.integers(0, 5000, 40) for _ in range(1200)]
    train = {"t": write_shard(tmp_path / "t", [rng.integers(5000, 10000, 1_000_000) for _ in range(3)])}
    r = C.check(train, {"ev": items}, ngram=N)
    s = r["eval"]["ev"]
    assert r["false_positive_rate"] == r["eval_ngrams"] / 2.0**64 and r["scanned_ngrams"] == 3_000_000 - N + 1
    mu = s["expected_false_items"]
    assert mu == pytest.approx(r["scanned_ngrams"] * s["ngrams"] / 2.0**64)
    assert s["any"]["items"] <= mu + 3 * math.sqrt(mu)


def write_task(d, name, records, data_files=None, extra="") -> str:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{name}.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    files = data_files if data_files is not None else {"test": f"{name}.jsonl"}
    cfg = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files}, "test_split": "test",
           "output_type": "multiple_choice", "doc_to_text": "{{query}}", "doc_to_target": "gold",
           "doc_to_choice": "{{choices}}"}
    (d / f"{name}.yaml").write_text(yaml.safe_dump(cfg) + extra)
    return str(d)


def test_task_dir_with_tokenizer(tmp_path, hf_tokenizer_dir, capsys):
    """A task as `megacpt make-task` writes it; fields tokenized one by one (transformers'
    tokenizer is the reference here): a record whose question or one choice is in the training
    shard is flagged, one whose only overlap spans two fields is not."""
    from transformers import AutoTokenizer

    from conftest_data import WORDS

    words = [w for w in WORDS if w.isascii() and w.isalpha()]
    wrng = np.random.default_rng(5)
    texts = [" ".join(wrng.choice(words, int(wrng.integers(4, 30)))) for _ in range(40)]
    records = [{"query": texts[i], "choices": [texts[i + 1], texts[i + 2]], "gold": 1} for i in range(0, 36, 3)]
    tok = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    n = 8
    rng = np.random.default_rng(3)
    filler = lambda: rng.integers(300, 400, 50)  # noqa: E731  (ids of long merges: no 8-gram of the text)
    spans = enc(records[7]["query"])[-4:] + enc(records[7]["choices"][0])[:4]
    docs = [filler(), enc(records[2]["query"]), filler(), enc(records[5]["choices"][1]), filler(), spans, filler()]
    assert all(len(enc(x)) >= n for x in (records[2]["query"], records[5]["choices"][1]))
    train = write_shard(tmp_path / "train", docs)
    task_dir = write_task(tmp_path / "tasks", "probe", records)
    out = tmp_path / "r.json"
    rc = main(["contamination", "--train", f"web={train}", "--eval", task_dir, "--tokenizer", hf_tokenizer_dir,
               "--ngram", str(n), "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    s = r["eval"]["probe"]
    assert s["kind"] == "task" and s["items"] == len(records)
    ref = reference({"web": train}, [[enc(x) for x in C._strings(rec)] for rec in records], n)["web"]
    assert set(s["sources"]["web"]["contaminated_ids"]) == ref[0] >= {2, 5}
    assert 7 not in ref[0]
    assert s["sources"]["web"]["tokens"] == sum(ref[1])
    assert s["tokens"] == sum(len(enc(x)) for rec in records for x in C._strings(rec))
    assert "probe" in capsys.readouterr().out
    # the YAML file alone names the same task
    r2 = C.check({"web": train}, [(None, str(tmp_path / "tasks" / "probe.yaml"))], ngram=n, tokenizer=hf_tokenizer_dir)
    assert r2["eval"]["probe"]["sources"]["web"]["contaminated_ids"] == s["sources"]["web"]["contaminated_ids"]


def test_shard_eval_set_and_json_schema(planted, tmp_path):
    """An eval shard prefix (one item per document, no tokenizer) through the CLI; the JSON keeps
    the documented keys and lists at most LISTED_IDS ids."""
    ev = write_shard(tmp_path / "valid", planted["items"])
    out = tmp_path / "r.json"
    rc = main(["contamination", "--train", planted["train"]["planted"], planted["train"]["clean"],
               "--eval", f"held={ev}", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert set(r) == {"ngram", "mode", "hash_bits", "false_positive_rate", "eval_ngrams", "scanned_ngrams",
                      "expected_false_matches", "train", "eval"}
    assert r["ngram"] == 13 and r["mode"] == "hashed" and r["hash_bits"] == 64
    assert set(r["train"]) == {"planted", "clean"} and r["train"]["planted"]["scanned_tokens"] == r["train"]["planted"]["tokens"]
    s = r["eval"]["held"]
    assert s["kind"] == "shards" and set(s["sources"]["planted"]["contaminated_ids"]) == planted["expected"]
    assert set(s["any"]) == {"items", "item_fraction", "tokens", "token_fraction", "contaminated_ids"}


def test_overlap_warnings(planted, tmp_path, monkeypatch):
    ev_clean = [np.arange(100, 140), np.arange(200, 260)]
    warnings = C.overlap_warnings(planted["train"], {"valid": write_shard(tmp_path / "v", planted["items"]),
                                                     "other": ev_clean}, threshold=0.05, max_train_tokens=None)
    assert len(warnings) == 1 and warnings[0].startswith("eval set valid: 6 of 59 items")
    assert C.overlap_warnings(planted["train"], {"valid": planted["items"]}, threshold=0.2) == []
    # a cap scans part of each source, spread over it, and says so
    capped = C.check(planted["train"], {"valid": planted["items"]}, max_train_tokens=1000)
    assert capped["train"]["planted"]["scanned_tokens"] <= 1000 < capped["train"]["planted"]["tokens"]
    tokens = capped["train"]["planted"]["tokens"]
    assert C._ranges(tokens, 1000) == [(0, 1000)]
    monkeypatch.setattr(C, "BLOCK_TOKENS", 100)
    spread = C._ranges(tokens, 1000)
    assert len(spread) == 10 and spread[0][0] == 0 and spread[-1][1] == tokens


def test_ngram_hashes_match_per_window_hashing():
    rng = np.random.default_rng(4)
    toks = rng.integers(0, 70000, 500).astype(np.int32)
    h = C.ngram_hashes(toks, 7)
    assert h.dtype == np.uint64 and len(h) == 494
    assert all(C.ngram_hashes(toks[i : i + 7], 7)[0] == h[i] for i in range(0, 494, 37))
    assert len(np.unique(h)) == 494 and len(C.ngram_hashes(toks[:6], 7)) == 0


def bad_cases(tmp_path, planted, tokenizer):
    train = planted["train"]["planted"]
    other = write_shard(tmp_path / "other", [np.arange(20)])
    (tmp_path / "other.json").write_text(json.dumps({"format": "megacpt-tokenized", "tokenizer": {"vocab_hash": "sha256:0"}}))
    no_files = write_task(tmp_path / "hub", "hub", [{"q": "x"}])
    (tmp_path / "hub" / "hub.yaml").write_text("task: hub\ndataset_path: cais/mmlu\ntest_split: test\n")
    bad_yaml = write_task(tmp_path / "bad", "bad", [{"q": "x"}])
    (tmp_path / "bad" / "bad.yaml").write_text("task: bad\ndataset_kwargs: {data_files: [\n")
    missing_file = write_task(tmp_path / "miss", "miss", [{"q": "x"}], data_files={"test": "nope.jsonl"})
    ok = write_task(tmp_path / "ok", "ok", [{"q": "x"}])
    return {
        "missing train prefix": (["--train", str(tmp_path / "nope"), "--eval", train], "no such shard"),
        "missing eval prefix": (["--train", train, "--eval", str(tmp_path / "nope")], "no such shard"),
        "task without local data": (["--train", train, "--eval", no_files, "--tokenizer", "x"], "dataset_path"),
        "malformed yaml": (["--train", train, "--eval", bad_yaml, "--tokenizer", "x"], "malformed YAML"),
        "data file missing": (["--train", train, "--eval", missing_file, "--tokenizer", "x"], "nope.jsonl"),
        "task without tokenizer": (["--train", train, "--eval", ok], "--tokenizer"),
        "ngram 0": (["--train", train, "--eval", train, "--ngram", "0"], "--ngram"),
        "workers 0": (["--train", train, "--eval", train, "--workers", "0"], "--workers"),
        "duplicate source": (["--train", train, train, "--eval", train], "named planted"),
        "another vocabulary": (["--train", other, "--eval", ok, "--tokenizer", tokenizer], "different vocabularies"),
    }


def test_cli_errors(planted, tmp_path, capsys, hf_tokenizer_dir):
    cases = bad_cases(tmp_path, planted, hf_tokenizer_dir)
    for name, (argv, fragment) in cases.items():
        out = tmp_path / f"{name.replace(' ', '_')}.json"
        capsys.readouterr()
        rc = main(["contamination", *argv, "--json", str(out)])
        err = capsys.readouterr().err
        assert rc == 2, (name, err)
        assert fragment in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not out.exists() and not list(tmp_path.glob(f"{out.name}*")), name


def test_task_yaml_tags_and_include(tmp_path, planted, hf_tokenizer_dir, capsys):
    """lm-eval's `!function` tag is read as text and `include:` is followed; a python tag is refused
    (the loader is a SafeLoader) without being constructed."""
    records = [{"q": "the model data train shard index merge prepare corpus language text document"}]
    d = tmp_path / "t"
    write_task(d, "base", records)
    (d / "child.yaml").write_text("include: base.yaml\ntask: child\nprocess_docs: !function utils.process\n")
    (d / "base.yaml").rename(d / "base.yml.txt")  # only child.yaml is a task file now
    (d / "child.yaml").write_text((d / "child.yaml").read_text().replace("base.yaml", "base.yml.txt"))
    r = C.check({"p": planted["train"]["planted"]}, [(None, str(d))], tokenizer=hf_tokenizer_dir)
    assert list(r["eval"]) == ["child"] and r["eval"]["child"]["items"] == 1
    marker = tmp_path / "pwned"
    (d / "child.yaml").write_text(f'task: x\nfoo: !!python/object/apply:os.system ["touch {marker}"]\n')
    capsys.readouterr()
    rc = main(["contamination", "--train", planted["train"]["planted"], "--eval", str(d), "--tokenizer", hf_tokenizer_dir])
    assert rc == 2 and "malformed YAML" in capsys.readouterr().err and not marker.exists()


def test_bench_contamination_smoke(tmp_path):
    """`megacpt bench contamination` end to end on tiny corpora (the numbers are not checked)."""
    out = tmp_path / "b.json"
    rc = main(["bench", "contamination", "--sizes", "50000,100000", "--items", "20", "--item-len", "30",
               "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert [(x["train_tokens"], x["workers"]) for x in r["runs"]] == [(50000, 1), (100000, 1), (100000, 2)]
    assert all(x["contaminated_items"] == 10 for x in r["runs"])  # one scan task here: no worker started
    assert r["summary"]["corpus_growth"] == 2.0

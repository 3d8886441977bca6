"""`megacpt make-task`: lm-eval tasks from your own text.

The checks read the written files back against the input documents (an item must be findable in
its source text, the label must point at the sentence that really follows), load the task through
lm-eval itself, and run it on a tiny random model.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest_data import big_vocab_tokenizer_dir, hf_tokenizer_dir  # noqa: F401 (fixtures)
from helpers import tiny_hf_model
from megacpt.cli import main
from megacpt.eval.make_task import cloze_item, segment

# Consonant-vowel syllables: the filler text can never produce the planted words below (CVC).
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
PLANTED_OUT = "Kelbor quorin velt masado prinu tasidu renafo miltok vanu kelbor."  # last word repeats
PLANTED_IN = "Quorin velt masado prinu kelbor tasidu renafo miltok vanu zentrafil."


def _filler_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))) for _ in range(300)]
    docs = []
    for _ in range(n):
        sents = []
        for _ in range(rng.randint(4, 9)):
            words = [rng.choice(vocab) for _ in range(rng.randint(6, 12))]
            sents.append(" ".join(words).capitalize() + rng.choice(".!?"))
        docs.append(" ".join(sents))
    return docs


def _norm(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = _filler_docs(40, seed=3) + [PLANTED_OUT, PLANTED_IN, PLANTED_IN]  # a repeat: one item
    path = d / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path, docs


def _make(tmp, corpus_path, tok, kind, *extra, out="tasks", name=None):
    out = Path(tmp) / out
    argv = ["make-task", "--from", str(corpus_path), "--tokenizer", tok, "--kind", kind, "--output", str(out), *extra]
    if name:
        argv += ["--name", name]
    assert main(argv) == 0
    name = name or f"{out.name}_{kind}"
    items = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
    return out, name, items


def test_segment_sentences():
    text = "It was late. The end came! Es ist z. B. die Sache. Ask J. Smith.\nA wrapped line\ncontinues here. Last one"
    got = [(s.text, s.terminated) for s in segment(text)]
    assert got == [
        ("It was late.", True),
        ("The end came!", True),
        ("Es ist z. B. die Sache.", True),
        ("Ask J. Smith.", True),
        ("A wrapped line continues here.", True),
        ("Last one", False),
    ]


def test_cloze_filter_unit():
    assert cloze_item(PLANTED_OUT) is None  # "kelbor" is already the first word (other case)
    assert cloze_item("Some words here and 42.") is None  # not letters
    assert cloze_item("Some words here and an.") is None  # too short
    assert cloze_item("We re-use.") is None  # not preceded by a space
    item = cloze_item(PLANTED_IN)
    assert item == {"context": PLANTED_IN[: -len(" zentrafil.")], "target": " zentrafil"}


def test_cloze_items_against_the_text(tmp_path, corpus, hf_tokenizer_dir):
    path, docs = corpus
    _, _, items = _make(tmp_path, path, hf_tokenizer_dir, "cloze")
    assert len(items) >= 20
    normed = [_norm(d) for d in docs]
    for it in items:
        word = it["target"][1:]
        assert it["target"].startswith(" ") and re.fullmatch(r"[^\W\d_]{3,}", word)
        assert word.lower() not in {w.lower() for w in re.findall(r"[^\W\d_]+", it["context"])}
        passage = _norm(it["context"] + it["target"])
        assert any(re.search(re.escape(passage) + r"[.!?]", d) for d in normed), passage
    contexts = [it["context"] for it in items]
    assert contexts.count(PLANTED_IN[: -len(" zentrafil.")]) == 1  # the planted passage that passes, once
    assert not any(c.startswith("Kelbor") for c in contexts)  # the one whose answer repeats is not


def test_continuation_labels_point_at_the_true_sentence(tmp_path, corpus, hf_tokenizer_dir):
    path, docs = corpus
    _, _, items = _make(tmp_path, path, hf_tokenizer_dir, "continuation", "--choices", "3")
    assert len(items) >= 20
    normed = [_norm(d) for d in docs]
    labels = set()
    for it in items:
        assert len(it["choices"]) == 3 and len({c.lower() for c in it["choices"]}) == 3
        labels.add(it["label"])
        home = [i for i, d in enumerate(normed) if _norm(it["context"]) in d]
        assert len(home) == 1
        src = normed[home[0]]
        assert _norm(it["context"]) + " " + it["choices"][it["label"]] in src
        for k, choice in enumerate(it["choices"]):
            if k != it["label"]:
                assert choice not in src  # drawn from another document
                assert any(choice in d for i, d in enumerate(normed) if i != home[0])
    assert labels == {0, 1, 2}


def test_same_seed_same_bytes_other_seed_other_items(tmp_path, corpus, hf_tokenizer_dir):
    path, _ = corpus
    files = {}
    for run, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        out, name, _ = _make(tmp_path / run, path, hf_tokenizer_dir, "continuation", "--seed", seed, "--n", "10",
                             out="t", name="probe")
        files[run] = [(out / f"probe.{ext}").read_bytes() for ext in ("jsonl", "yaml")]
    # The YAML names its data file by absolute path, so compare it with the folder replaced.
    assert files["a"][0] == files["b"][0]
    assert files["a"][1].replace(b"/a/", b"/b/") == files["b"][1]
    assert files["a"][0] != files["c"][0]
    again, _, _ = _make(tmp_path / "a", path, hf_tokenizer_dir, "continuation", "--seed", "7", "--n", "10",
                        out="t", name="probe")
    assert [(again / f"probe.{ext}").read_bytes() for ext in ("jsonl", "yaml")] == files["a"]


def test_loads_in_lm_eval_from_another_cwd(tmp_path, corpus, hf_tokenizer_dir, monkeypatch):
    from lm_eval.tasks import TaskManager, get_task_dict  # heavy: only this test needs lm-eval

    path, _ = corpus
    monkeypatch.chdir(tmp_path)
    _make(".", path, hf_tokenizer_dir, "cloze", "--n", "12", name="cz")
    _, _, mc_items = _make(".", path, hf_tokenizer_dir, "continuation", "--n", "8", name="mc")
    cz_items = [json.loads(line) for line in Path("tasks/cz.jsonl").read_text().splitlines()]
    cfg = yaml.safe_load(Path("tasks/cz.yaml").read_text())
    assert cfg["dataset_path"] == "json" and cfg["metadata"]["filter"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tasks = get_task_dict(["cz", "mc"], TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    cz, mc = tasks["cz"], tasks["mc"]
    assert [dict(d) for d in cz.test_docs()] == cz_items
    assert [dict(d) for d in mc.test_docs()] == mc_items
    for task in (cz, mc):
        task.build_all_requests(limit=None, rank=0, world_size=1)
    assert [i.arguments for i in cz.instances] == [(it["context"], it["target"]) for it in cz_items]
    want = [(it["context"], " " + c) for it in mc_items for c in it["choices"]]
    assert [i.arguments for i in mc.instances] == want
    assert [mc.doc_to_target(d) for d in mc.test_docs()] == [it["label"] for it in mc_items]


def test_runs_in_lm_eval_on_a_tiny_model(tmp_path, corpus, hf_tokenizer_dir):
    import lm_eval  # heavy: only this test runs an evaluation
    from lm_eval.tasks import TaskManager

    path, _ = corpus
    model = tiny_hf_model(tmp_path / "model", vocab=512, max_pos=256)
    for f in Path(hf_tokenizer_dir).iterdir():
        shutil.copy(f, model / f.name)
    out, _, _ = _make(tmp_path, path, hf_tokenizer_dir, "cloze", "--n", "6", name="cz")
    _make(tmp_path, path, hf_tokenizer_dir, "continuation", "--n", "6", name="mc")
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=float32", tasks=["cz", "mc"],
                                  task_manager=TaskManager(include_path=str(out), include_defaults=False),
                                  device="cpu", batch_size=8)
    cz, mc = res["results"]["cz"], res["results"]["mc"]
    assert 0 <= cz["acc,none"] <= 1 and cz["perplexity,none"] > 1
    assert 0 <= mc["acc,none"] <= 1 and 0 <= mc["acc_norm,none"] <= 1
    assert res["n-samples"]["cz"]["effective"] == 6 and res["n-samples"]["mc"]["effective"] == 6


def test_from_shards_decodes_with_the_tokenizer(tmp_path, corpus, hf_tokenizer_dir, big_vocab_tokenizer_dir):
    path, docs = corpus
    prefix = tmp_path / "shards" / "held"
    assert main(["prepare", "--input", str(path), "--tokenizer", hf_tokenizer_dir, "--output", str(prefix),
                 "--workers", "1"]) == 0
    _, _, from_shards = _make(tmp_path, prefix, hf_tokenizer_dir, "cloze", name="s")
    _, _, from_text = _make(tmp_path, path, hf_tokenizer_dir, "cloze", name="t")
    assert from_shards == from_text  # the shard documents decode to the text they came from
    out = tmp_path / "wrong"
    assert main(["make-task", "--from", str(prefix), "--tokenizer", big_vocab_tokenizer_dir, "--kind", "cloze",
                 "--output", str(out)]) == 2
    assert not out.exists()


def test_cli_errors_write_nothing(tmp_path, corpus, hf_tokenizer_dir, capsys):
    path, _ = corpus
    out = tmp_path / "out"
    base = ["make-task", "--tokenizer", hf_tokenizer_dir, "--output", str(out)]
    cases = [
        ["--from", str(tmp_path / "missing.jsonl"), "--kind", "cloze"],
        ["--from", str(path), "--kind", "cloze", "--n", "100000"],
        ["--from", str(path), "--kind", "continuation", "--n", "0"],
        ["--from", str(path), "--kind", "cloze", "--name", "bad name"],
        ["--from", str(path), "--kind", "continuation", "--choices", "1"],
    ]
    for extra in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        assert not out.exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["make-task", "--from", str(path), "--tokenizer", hf_tokenizer_dir, "--kind", "cloze",
                 "--output", str(blocker)]) == 2
    assert blocker.read_text() == "x"

"""`megacpt eval --tasks`: megacpt's own model as an lm-eval LM against lm-eval's `hf` backend on the
same directory (item for item), the JSON schema, and the one-line errors for bad task input.
In-loop task metrics (eval.tasks) are checked on the training runs of test_train_zero/_tp."""

import json
import sys
from pathlib import Path

import pytest

from conftest_data import hf_tokenizer_dir, make_docs  # noqa: F401 (fixture)
from helpers import random_docs, tiny_hf_model, write_shard

lm_eval = pytest.importorskip("lm_eval")


def _task_files(out: Path, docs: list[str]) -> Path:
    """A multiple-choice, a generation and a rolling-loglikelihood task over BPE text."""
    out.mkdir(parents=True, exist_ok=True)
    rows = {
        "bpe_choice": [{"q": d, "choices": [" ".join(docs[(i + 1) % 30].split()[:4]), " ".join(docs[i].split()[-3:]),
                                            docs[i][::-1][:12]], "label": i % 3}
                       for i, d in enumerate(docs[:10])],
        "bpe_gen": [{"prompt": " ".join(d.split()[:-1]) or "the", "answer": d.split()[-1]} for d in docs[10:22]],
        "bpe_roll": [{"text": d} for d in docs[22:30]],
    }
    specs = {
        "bpe_choice": "output_type: multiple_choice\ndoc_to_text: '{{q}} Answer:'\ndoc_to_choice: '{{choices}}'\n"
                      "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "bpe_gen": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
                   "generation_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 6\n  do_sample: false\n"
                   "metric_list:\n  - metric: exact_match\n",
        "bpe_roll": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                    "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
    }
    for name, items in rows.items():
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in items)
        tag = "tag: bpe_tag\n" if name != "bpe_roll" else ""
        (out / f"{name}.yaml").write_text(f"task: {name}\n{tag}dataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                          f"    test: {out / (name + '.jsonl')}\ntest_split: test\n{specs[name]}")
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, hf_tokenizer_dir):  # noqa: F811
    from tokenizers import processors
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("tasks")
    tok = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    # A tokenizer that adds BOS (as Llama's and Gemma's do), and a short model: contexts are
    # left-truncated and documents span several rolling windows, as with real models and tasks.
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)])
    model = tiny_hf_model(tmp / "model", vocab=len(tok), max_pos=40, perturb=True, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    tok.save_pretrained(model)
    assert AutoTokenizer.from_pretrained(model).encode("the model")[0] == tok.bos_token_id
    tasks = _task_files(tmp / "tasks", make_docs(30, seed=5, newlines=False))
    shard = write_shard(tmp / "held", random_docs(20, len(tok), 3))
    return {"tmp": tmp, "model": model, "tasks": tasks, "shard": shard}


NAMES = ["bpe_choice", "bpe_gen", "bpe_roll"]


@pytest.fixture(scope="module")
def reference(setup):
    """lm-eval's own `hf` backend on the same directory."""
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={setup['model']},dtype=float32", tasks=NAMES,
                                   task_manager=TaskManager(include_path=str(setup["tasks"])), device="cpu",
                                   batch_size=4, bootstrap_iters=0, log_samples=True)


def test_eval_tasks_equals_lm_eval_hf_item_for_item(setup, reference):
    import torch
    from transformers import AutoTokenizer

    from megacpt.eval.harness import MegacptLM
    from megacpt.eval.tasks import TaskSpec, evaluate_tasks, load_tasks, summarize
    from megacpt.export import load_model_source
    from megacpt.train.parallelize import BuildSpec, build_model

    names, ref = NAMES, reference
    spec = TaskSpec(tuple(names), str(setup["tasks"]))
    args, _, weights, _ = load_model_source(setup["model"])
    model = build_model(BuildSpec(args, dtype=torch.float32), weights=weights).eval()
    lm = MegacptLM(model, AutoTokenizer.from_pretrained(setup["model"]), args.max_position_embeddings, batch_size=3)
    ours = evaluate_tasks(lm, spec, load_tasks(spec), bootstrap_iters=0)
    for name in names:
        assert len(ours["samples"][name]) == len(ref["samples"][name]) > 0
        for a, b in zip(ref["samples"][name], ours["samples"][name]):
            assert a["doc_id"] == b["doc_id"]
            if name == "bpe_gen":
                assert a["resps"] == b["resps"]  # the generated text
            else:
                for ra, rb in zip(a["resps"], b["resps"]):  # [(loglikelihood, is_greedy)] or [loglikelihood]
                    ra, rb = (ra[0], rb[0]) if isinstance(ra[0], (tuple, list)) else (ra, rb)
                    assert rb[0] == pytest.approx(ra[0], rel=1e-4, abs=1e-5)
                    assert list(rb[1:]) == list(ra[1:])  # is_greedy
            for metric in a["metrics"]:
                assert b[metric] == pytest.approx(a[metric], rel=1e-4), (name, metric)
    want, got = summarize(ref), summarize(ours)
    assert got.keys() == want.keys()
    for name in names:
        assert got[name] == pytest.approx(want[name], rel=1e-4)
    # not vacuous: some requests were left-truncated and some documents took several rolling windows
    tok = AutoTokenizer.from_pretrained(setup["model"])
    rows = [json.loads(x) for f in ("bpe_choice", "bpe_roll") for x in open(setup["tasks"] / f"{f}.jsonl")]
    assert any(len(tok.encode(r.get("q", r.get("text", "")))) > args.max_position_embeddings + 1 for r in rows)


def test_cli_json_has_data_sets_and_tasks(setup, reference):
    from megacpt.cli import main
    from megacpt.eval.tasks import summarize

    out = setup["tmp"] / "eval.json"
    rc = main(["eval", "--model", str(setup["model"]), "--data", f"held={setup['shard']}", "--seq-len", "32",
               "--tasks", "bpe_choice,bpe_gen", "--include-path", str(setup["tasks"]), "--batch-size", "2",
               "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) == {"held", "tasks"}
    assert set(res["held"]) == {"loss", "ppl", "tokens"}
    assert res["tasks"]["bpe_choice"]["n"] == 10 and res["tasks"]["bpe_gen"]["n"] == 12
    assert {"acc", "acc_norm", "acc_stderr"} <= set(res["tasks"]["bpe_choice"])
    assert "exact_match" in res["tasks"]["bpe_gen"]
    want = summarize(reference)  # the same numbers as lm-eval's hf backend
    for name in ("bpe_choice", "bpe_gen"):
        for k, v in want[name].items():
            assert res["tasks"][name][k] == pytest.approx(v, rel=1e-4), (name, k)
    # --limit and --num-fewshot reach lm-eval; a tag names the tasks that carry it
    rc = main(["eval", "--model", str(setup["model"]), "--tasks", "bpe_tag", "--include-path",
               str(setup["tasks"]), "--limit", "4", "--num-fewshot", "2", "--json", str(out)])
    got = json.loads(out.read_text())["tasks"]
    assert rc == 0 and set(got) == {"bpe_choice", "bpe_gen"} and got["bpe_choice"]["n"] == got["bpe_gen"]["n"] == 4


def _bad(setup, tmp_path, *extra, tasks_dir=None):
    from megacpt.cli import main

    out = tmp_path / "never.json"
    rc = main(["eval", "--model", str(setup["model"]), "--include-path", str(tasks_dir or setup["tasks"]),
               "--json", str(out), *extra])
    assert rc == 2 and not out.exists() and not list(tmp_path.glob("never.json*"))


def test_bad_task_input_is_one_line_exit_2(setup, tmp_path, capsys):
    """Task needing a download, malformed YAML, few-shot beyond the pool, a data set named
    `tasks`, nothing to evaluate; then an unknown name (lm-eval's whole index: slowest, last)."""
    d = tmp_path / "dl"
    d.mkdir()
    (d / "hub_task.yaml").write_text("task: hub_task\ndataset_path: some_org/some_dataset\ntest_split: test\n"
                                     "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\n"
                                     "doc_to_target: 0\n")
    _bad(setup, tmp_path, "--tasks", "hub_task", tasks_dir=d)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not available offline" in err[0] and "data_files" in err[0]
    m = tmp_path / "malformed"
    m.mkdir()
    (m / "broken.yaml").write_text("task: broken\n  dataset_path: [json\n")
    _bad(setup, tmp_path, "--tasks", "broken", tasks_dir=m)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.yaml" in err[0] and "malformed" in err[0]
    _bad(setup, tmp_path, "--tasks", "bpe_choice", "--num-fewshot", "10")  # 10 items: 9 can be shots
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "few-shot pool has 9" in err[0]
    g = tmp_path / "gen"
    g.mkdir()
    for i, extra in enumerate(("do_sample: true", "num_beams: 4")):
        (g / f"g{i}.yaml").write_text(
            (setup["tasks"] / "bpe_gen.yaml").read_text().replace("task: bpe_gen", f"task: g{i}")
            .replace("  do_sample: false", f"  {extra}"))
        _bad(setup, tmp_path, "--tasks", f"g{i}", tasks_dir=g)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("greedy" in err[0]), err
    _bad(setup, tmp_path, "--tasks", "bpe_choice", "--data", f"tasks={setup['shard']}")
    assert "may not be named 'tasks'" in capsys.readouterr().err
    _bad(setup, tmp_path)
    assert "nothing to evaluate" in capsys.readouterr().err
    _bad(setup, tmp_path, "--tasks", "bpe_choise")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task 'bpe_choise'" in err[0] and "bpe_choice" in err[0]


def test_eval_help_and_errors_do_not_import_lm_eval(setup):
    """--tasks is optional: a perplexity-only eval never imports lm-eval."""
    import subprocess

    code = ("import sys; from megacpt.cli import main; "
            f"rc = main(['eval', '--model', {str(setup['model'])!r}, '--data', 'x={setup['shard']}', "
            "'--seq-len', '32']); assert rc == 0; assert 'lm_eval' not in sys.modules, 'lm_eval imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

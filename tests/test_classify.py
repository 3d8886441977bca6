"""task: classify — a linear head on the last real token: metrics against a hand computation,
the export against transformers' *ForSequenceClassification, 2 ZeRO-3 ranks against one process,
a linear probe that leaves the backbone bit for bit, and one-line errors for bad labels."""

import json
import random

import numpy as np
import pytest
import torch

from helpers import assert_runs_match, run_ok, tiny_hf_model, tiny_run_config, word_tokenizer, write_config

LABELS = ["neg", "pos", "zzz"]


def test_metrics_equal_a_hand_computation():
    from megacpt.data.classify import predictions_metrics

    gold = np.array([0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0, 3])  # class 3 only predicted: counts, with F1 0
    m = predictions_metrics(pred, gold)
    assert m["accuracy"] == pytest.approx(4 / 7)
    # per class: 0: tp1 fp1 fn1 → 2/4; 1: tp2 fp1 fn0 → 4/5; 2: tp1 fp0 fn2 → 2/4; 3: 0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.5 + 0.0) / 4)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _examples(n, seed):
    """Label by which of three word ranges the first word comes from, with noise words after."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        k = rnd.randrange(3)
        first = f"w{rnd.randrange(1 + 40 * k, 40 + 40 * k)}"
        rest = " ".join(f"w{rnd.randrange(1, 128)}" for _ in range(rnd.randrange(2, 9)))
        out.append({"text": f"{first} {rest}", "label": LABELS[k]})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classify")
    model = tiny_hf_model(tmp / "model", tied=False)
    word_tokenizer(model)
    train = _write(tmp / "train.jsonl", _examples(64, 1))
    valid = _write(tmp / "valid.jsonl", _examples(11, 2))
    out = {"tmp": tmp, "model": model, "valid": valid}

    def cfg(name, zero, **kw):
        c = tiny_run_config(tmp, model, tmp / name, steps=4, zero=zero, gb=4, mb=1, seq=12, **kw)
        c["task"] = "classify"
        c["data"]["train"] = [{"name": "train", "path": str(train)}]
        c["data"]["valid"] = [{"name": "held", "path": str(valid)}]
        c["train"]["eval_interval"] = 2
        c["classify"] = {"gap_examples": 16}
        if zero == 3:
            c["deepspeed"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
        out[name] = tmp / name
        out[f"{name}_cfg"] = write_config(tmp / f"{name}.yaml", c)
        return out[f"{name}_cfg"]

    run_ok(1, cfg("single", 0))
    run_ok(2, cfg("zero3", 3))
    run_ok(1, cfg("probe", 0, **{"train.freeze": ["backbone"], "optim.lr": 1e-2}))
    run_ok(1, cfg("lora", 0, adapter={"kind": "lora", "r": 4, "alpha": 8}))
    return out


def _valid_records(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "valid/held/loss" in r}


@pytest.mark.slow
def test_export_is_a_transformers_classifier_with_the_same_logits(runs, tmp_path):
    import transformers

    from megacpt.cli import main
    from megacpt.data.classify import predictions_metrics

    assert main(["export", str(runs["single"]), "--output", str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert cfg["id2label"] == {str(i): n for i, n in enumerate(LABELS)} and cfg["pad_token_id"] == 0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(runs["model"])
    rows = [json.loads(x) for x in runs["valid"].read_text().splitlines()]
    ids = [tok(r["text"])["input_ids"][:12] for r in rows]
    batch = torch.tensor([x + [0] * (12 - len(x)) for x in ids])
    with torch.no_grad():
        logits = model(batch).logits.double()  # HF pools the last token before the first pad
    gold = torch.tensor([LABELS.index(r["label"]) for r in rows])
    loss = torch.nn.functional.cross_entropy(logits, gold)
    last = _valid_records(runs["single"])[4]
    assert float(loss) == pytest.approx(last["valid/held/loss"], rel=1e-5)
    m = predictions_metrics(logits.argmax(-1).numpy(), gold.numpy())
    assert m["accuracy"] == last["valid/held/accuracy"] and m["macro_f1"] == pytest.approx(last["valid/held/macro_f1"])
    assert last["valid/held/gap"] == pytest.approx(last["valid/held/loss"] - last["train_sample/loss"])


@pytest.mark.slow
def test_lora_classifier_trains_the_adapter_and_the_head(runs, tmp_path):
    """LoRA on a classifier: the head trains whole beside the factors (PEFT's SEQ_CLS does the same);
    the merged export is a transformers classifier with the run's held-out loss."""
    import transformers

    from megacpt.cli import main
    from megacpt.models.hf import HFWeights

    assert main(["export", str(runs["lora"]), "--output", str(tmp_path / "hf")]) == 0
    init = torch.empty(3, 32).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(7))
    after = HFWeights(tmp_path / "hf")
    assert (after.get("score.weight") - init).abs().max() > 1e-4
    before = HFWeights(runs["model"])
    q = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before.get(q), after.get(q))  # merged: W + B·A·alpha/r
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(runs["model"])
    rows = [json.loads(x) for x in runs["valid"].read_text().splitlines()]
    ids = [tok(r["text"])["input_ids"][:12] for r in rows]
    with torch.no_grad():
        logits = model(torch.tensor([x + [0] * (12 - len(x)) for x in ids])).logits.double()
    gold = torch.tensor([LABELS.index(r["label"]) for r in rows])
    loss = float(torch.nn.functional.cross_entropy(logits, gold))
    assert loss == pytest.approx(_valid_records(runs["lora"])[4]["valid/held/loss"], rel=1e-5)


@pytest.mark.slow
def test_eval_of_a_classifier_is_its_backbone_as_a_language_model(runs, tmp_path, capsys):
    """The forgetting measure: `megacpt eval --data` of a classify run reads its backbone with the LM
    head the run kept (untied here, frozen) — the same as transformers' causal LM of the base model
    carrying the exported classifier's backbone."""
    import transformers

    from megacpt.cli import main

    shard = runs["tmp"] / "data" / "old_valid"

    def loss(model, name):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--model", str(model), "--data", f"orig={shard}", "--seq-len", "8", "--json", str(out)]) == 0
        return json.loads(out.read_text())["orig"]["loss"]

    base = loss(runs["model"], "base")
    assert loss(runs["probe"], "probe") == base  # a linear probe forgets nothing
    assert main(["export", str(runs["single"]), "--output", str(tmp_path / "cls")]) == 0
    lm = transformers.AutoModelForCausalLM.from_pretrained(runs["model"])
    backbone = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").model
    lm.model.load_state_dict(backbone.state_dict())  # strict: every backbone tensor
    lm.save_pretrained(tmp_path / "lm")
    tuned = loss(runs["single"], "single")
    assert tuned == pytest.approx(loss(tmp_path / "lm", "reference"), rel=1e-6) and tuned != base
    capsys.readouterr()
    # The untied classifier's export has no LM head to read the backbone with.
    assert main(["eval", "--model", str(tmp_path / "cls"), "--data", f"orig={shard}",
                 "--json", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "sequence classifier without an LM head" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.slow
def test_two_zero3_ranks_equal_one_process(runs):
    assert_runs_match(runs["single"], runs["zero3"], range(1, 5))
    va, vb = _valid_records(runs["single"]), _valid_records(runs["zero3"])
    assert sorted(va) == sorted(vb) == [0, 2, 4]
    for s in va:
        assert vb[s]["valid/held/accuracy"] == va[s]["valid/held/accuracy"]
        assert vb[s]["valid/held/loss"] == pytest.approx(va[s]["valid/held/loss"], rel=1e-5)


@pytest.mark.slow
def test_linear_probe_trains_only_the_head(runs, tmp_path):
    from megacpt.cli import main
    from megacpt.models.hf import HFWeights

    assert main(["export", str(runs["probe"]), "--output", str(tmp_path / "hf")]) == 0
    before, after = HFWeights(runs["model"]), HFWeights(tmp_path / "hf")
    assert "score.weight" in after.keys() and "lm_head.weight" not in after.keys()
    for k in before.keys():
        if k != "lm_head.weight":
            assert torch.equal(before.get(k), after.get(k)), k
    # The head starts as transformers initialises one (normal, std 0.02, from the run's seed) and trains.
    init = torch.empty(3, 32).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(7))
    single = _valid_records(runs["single"])[0]
    assert _valid_records(runs["probe"])[0]["valid/held/loss"] == single["valid/held/loss"]  # same start
    assert not torch.equal(after.get("score.weight"), init)
    assert (after.get("score.weight") - init).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("bad, message", [
    ("train", 'label must be a non-empty string or an integer, got None'),
    ("valid", "label 'other' is not among the classifier's labels ['neg', 'pos', 'zzz']"),
    ("weights", "task: classify pools the examples of all of a phase's sources"),
])
def test_bad_labels_stop_with_one_line(runs, bad, message, tmp_path, capsys):
    from megacpt.cli import main

    sets = ["--set", f"run_dir={tmp_path / 'run'}"]
    if bad == "train":
        f = _write(tmp_path / "t.jsonl", _examples(5, 3) + [{"text": "w1 w2"}])
        sets += ["--set", f"data.train.0.path={f}"]
    elif bad == "valid":
        f = _write(tmp_path / "v.jsonl", _examples(5, 3) + [{"text": "w1 w2", "label": "other"}])
        sets += ["--set", f"data.valid.0.path={f}"]
    else:
        sets += ["--set", "data.train.0.weight=0.5"]
    assert main(["train", str(runs["single_cfg"]), *sets]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_report_plots_the_gap(runs, tmp_path):
    from megacpt.cli import main

    assert main(["report", str(runs["single"]), str(runs["probe"]), "--output", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "classify.png").stat().st_size > 0
    plots = json.loads((tmp_path / "rep" / "report.json").read_text())["plots"]
    gap = plots["classify"]["panels"]["held: gap (held-out − training)"]["single"]
    logged = _valid_records(runs["single"])
    assert gap["y"] == [logged[s]["valid/held/gap"] for s in (0, 2, 4)]

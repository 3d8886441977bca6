"""End-to-end training over real launches: ZeRO-3 on 2 gloo ranks against one ZeRO-0 process,
and stop/resume against uninterrupted runs. All runs are made once per module (launches are the
expensive part) and then compared."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import (assert_runs_match, checkpoint_tensors, cpu_env, launch, read_metrics, run_ok, tiny_hf_model,
                     tiny_run_config, train_losses, word_tasks, word_tokenizer, write_config)
from golden import check_golden

pytestmark = pytest.mark.slow

ZERO3_SHARDED = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
TASK_NAMES = ["tiny_choice", "tiny_gen", "tiny_roll"]
# A by-position validation set (data.valid[].by_position) with its own window length, on the
# single and ZeRO-3 runs: documents of the "original" held-out shard are 11 to 57 tokens long, so
# within data.valid_tokens (128) the windows have 44, 41, 30, 10 and 3 input tokens (the last cut):
# three buckets, every micro-batch padded (to 48), and with 2 ranks one dummy forward call.
BY_POSITION = {"name": "doc", "seq_len": 48, "by_position": 16}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero")
    model = tiny_hf_model(tmp / "model", tied=False)
    word_tokenizer(model)
    # lm-eval tasks in the loop (eval.tasks) on the single and ZeRO-3 runs: single_resumed has none,
    # so its bit-identical resume comparison with `single` also shows they leave training alone.
    # 5 items, 2 per batch: with 2 ranks one rank runs out of generation and rolling requests first
    # and makes dummy forward calls, so that the ranks' collectives line up.
    tasks = {"eval.tasks": {"names": TASK_NAMES, "include_path": str(word_tasks(tmp / "tasks", n=5)), "interval": 3,
                            "batch_size": 2}}
    out = {"model": model, "tasks": tmp / "tasks"}

    def cfg(name, zero, by_position=False, **kw):
        c = tiny_run_config(tmp, model, tmp / name, steps=5, zero=zero, gb=4, mb=1,
                            deepspeed=ZERO3_SHARDED if zero == 3 else {}, **kw)
        if by_position:
            c["data"]["valid"].append({**BY_POSITION, "path": str(tmp / "data" / "old_valid")})
        return write_config(tmp / f"{name}.yaml", c)

    # Reference: one process, no ZeRO, 4 micro-batches accumulated per step.
    out["single"] = tmp / "single"
    run_ok(1, cfg("single", 0, by_position=True, **tasks))
    # 2 ranks, ZeRO-3 sharding everything, 2 micro-batches per rank per step.
    out["zero3"] = tmp / "zero3"
    run_ok(2, cfg("zero3", 3, by_position=True, tensorboard=True, **tasks))
    # The same, stopped after 2 steps and resumed (a second launch), with asynchronous saves: its
    # losses and checkpoint are compared bit for bit with zero3's, saved synchronously.
    out["zero3_resumed"] = tmp / "zero3_resumed"
    c = cfg("zero3_resumed", 3, **{"checkpoint.async": True})
    r1 = run_ok(2, c, "train.stop_after=2")
    out["zero3_first_stdout"] = r1.stdout
    run_ok(2, c)
    # Context parallelism: the same 2 ranks splitting each sequence (cp=2, so dp=1) under ZeRO-3, with
    # the tasks in the loop (whole sequences, CP off), stopped after 3 steps and resumed with cp=1
    # (dp=2): at one world size ZeRO's partitions span the same dp × cp ranks for every cp.
    out["cp2"] = tmp / "cp2"
    c = cfg("cp2", 3, **tasks, **{"parallel.cp": 2})
    run_ok(2, c, "train.stop_after=3")
    run_ok(2, c, "parallel.cp=1")
    # One process, stopped after 3 steps and resumed, logging to W&B (offline) and MLflow (sqlite).
    out["single_resumed"] = tmp / "single_resumed"
    c = cfg("single_resumed", 0, by_position=True, **{"logging.backends": ["wandb", "mlflow"]})
    run_ok(1, c, "train.stop_after=3")
    # The by-position set gets shorter windows on resume: its base perplexity no longer applies.
    out["single_resumed_stdout"] = run_ok(1, c, "data.valid.2.seq_len=40").stdout
    out["resume_cfg"] = c
    # Start from the ZeRO-3 run's checkpoint (weights only) in a fresh run: one process, ZeRO-0.
    out["from_ckpt"] = tmp / "from_ckpt"
    c = tiny_run_config(tmp, model, tmp / "from_ckpt", steps=1, zero=0)
    c["model"]["init_from"] = str(tmp / "zero3")
    # A validation set that is the training data itself: the start-up contamination check warns.
    c["data"]["valid"].append({"name": "leak", "path": c["data"]["train"][0]["path"]})
    out["from_ckpt_stdout"] = run_ok(1, write_config(tmp / "from_ckpt.yaml", c)).stdout
    out["tmp"] = tmp
    return out


def test_zero3_matches_single_process(runs):
    a, b = train_losses(runs["single"]), train_losses(runs["zero3"])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    la = torch.tensor([a[s]["loss"] for s in range(1, 6)], dtype=torch.float64)
    lb = torch.tensor([b[s]["loss"] for s in range(1, 6)], dtype=torch.float64)
    ga = torch.tensor([a[s]["grad_norm"] for s in range(1, 6)], dtype=torch.float64)
    gb = torch.tensor([b[s]["grad_norm"] for s in range(1, 6)], dtype=torch.float64)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)
    assert (ga > 0).all() and la.std() > 0  # the comparison is not vacuous
    # clipping is on (grad_clip 1.0) and these norms exceed it at least once
    assert (ga > 1.0).any()


def test_cp2_then_cp1_matches_single_process(runs):
    """Steps 1-3 with each sequence split over 2 ranks, 4-5 after resuming with cp=1: losses, clipped
    grad norms, samples, validation and task metrics as one process."""
    a, b = train_losses(runs["single"]), train_losses(runs["cp2"])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    assert_runs_match(runs["single"], runs["cp2"], range(1, 6))
    valid = [{r["step"]: r for r in read_metrics(runs[n]) if "valid/new/loss" in r} for n in ("single", "cp2")]
    assert sorted(valid[0]) == sorted(valid[1]) == [0, 5]
    for step in (0, 5):
        for name in ("new", "original"):
            assert valid[1][step][f"valid/{name}/loss"] == pytest.approx(valid[0][step][f"valid/{name}/loss"],
                                                                          rel=1e-5)
    single, cp2 = _task_records(runs["single"]), _task_records(runs["cp2"])
    assert sorted(single) == sorted(cp2) == [0, 3, 5]
    for step in single:
        assert cp2[step].keys() == single[step].keys()
        for k, v in single[step].items():
            assert cp2[step][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (step, k)
    assert sorted(p.name for p in (runs["cp2"] / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000005"]


def test_zero3_really_shards(runs):
    layout = json.loads((runs["zero3"] / "layout.json").read_text())
    assert layout["world_size"] == 2 and layout["zero_stage"] == 3
    for name, p in layout["params"].items():
        half = -(-p["numel"] // 2)
        assert p["per_rank"] == [half, half], name
    single = json.loads((runs["single"] / "layout.json").read_text())
    assert all(p["per_rank"] == [p["numel"]] for p in single["params"].values())


def test_metrics_fields(runs):
    recs = train_losses(runs["zero3"])
    r = recs[5]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu",
                "tokens/new", "tokens/replay", "step_time_s", "peak_memory_mb"):
        assert key in r, key
    assert r["mfu"] is None  # CPU: no known peak
    assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 2)
    assert r["tokens/new"] + r["tokens/replay"] == 5 * 4 * 16
    lines = [json.loads(x) for x in (runs["zero3"] / "metrics.jsonl").read_text().splitlines()]
    valid = [x for x in lines if "valid/new/ppl" in x]
    assert [x["step"] for x in valid] == [0, 5]
    assert "valid/original/ppl" in valid[-1] and "valid/new/ppl_vs_base" in valid[-1]
    events = list((runs["zero3"] / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.parametrize("pair", [("zero3", "zero3_resumed"), ("single", "single_resumed")])
def test_resume_is_bit_identical(runs, pair):
    full, resumed = runs[pair[0]], runs[pair[1]]
    a, b = train_losses(full), train_losses(resumed)
    assert [a[s]["loss"] for s in range(1, 6)] == [b[s]["loss"] for s in range(1, 6)]
    assert [a[s]["grad_norm"] for s in range(1, 6)] == [b[s]["grad_norm"] for s in range(1, 6)]
    assert [a[s]["tokens/new"] for s in range(1, 6)] == [b[s]["tokens/new"] for s in range(1, 6)]
    ta = checkpoint_tensors(full / "checkpoints" / "step_00000005")
    tb = checkpoint_tensors(resumed / "checkpoints" / "step_00000005")
    assert ta.keys() == tb.keys() and len(ta) > 0
    weights = [k for k in ta if ta[k].is_floating_point() and ta[k].numel() > 100]
    assert weights, "no weight tensors found in the checkpoint"
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_stop_after_checkpoints_and_says_so(runs):
    out = runs["zero3_first_stdout"]
    assert "stopped at step 2/5 (train.stop_after)" in out
    # an async save is published (and said so) before the stop message
    assert out.index("checkpoint saved: ") < out.index("stopped at step 2/5")
    ckpts = sorted(p.name for p in (runs["zero3_resumed"] / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002", "step_00000005"]  # keep: 2
    assert (runs["zero3_resumed"] / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    saves = [r for r in read_metrics(runs["zero3_resumed"]) if r.get("event") == "checkpoint"]
    assert [(r["step"], r["async"]) for r in saves] == [(2, True), (5, True)] and all(r["blocked_s"] >= 0 for r in saves)


def test_resume_with_changed_config_is_refused(runs, capsys):
    from megacpt.cli import main

    rc = main(["train", str(runs["resume_cfg"]), "--set", "optim.lr=0.5", "--set", "data.train.0.weight=0.5"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "data.train.0.weight" in err and "optim.lr" in err and "declare a new phase" in err


def _final_valid(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "valid/new/loss" in x]


def test_init_from_checkpoint_starts_from_its_weights(runs):
    """A new run with init_from=<ZeRO-3 run> starts where that run ended (weights only)."""
    end_of_zero3 = _final_valid(runs["zero3"])[-1]
    start = _final_valid(runs["from_ckpt"])[0]
    assert start["step"] == 0
    assert start["valid/new/loss"] == pytest.approx(end_of_zero3["valid/new/loss"], rel=1e-6)
    assert start["valid/original/loss"] == pytest.approx(end_of_zero3["valid/original/loss"], rel=1e-6)
    # fresh schedule: the first step warms up again
    assert train_losses(runs["from_ckpt"])[1]["lr"] == pytest.approx(1e-3 / 2)


@pytest.mark.parametrize("run", ["zero3", "single"])
def test_export_loads_in_transformers_with_same_perplexity(runs, run, tmp_path):
    import transformers

    from megacpt.cli import main
    from megacpt.eval.perplexity import eval_windows

    out = tmp_path / "hf"
    assert main(["export", str(runs[run]), "--output", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    w = torch.from_numpy(eval_windows(f"{runs['tmp']}/data/new_valid", 16, 128))
    with torch.no_grad():
        logits = model(w[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), w[:, 1:].reshape(-1))
    final = _final_valid(runs[run])[-1]
    assert float(loss) == pytest.approx(final["valid/new/loss"], rel=1e-5)
    # and megacpt eval on the export agrees with megacpt eval on the run itself
    assert main(["eval", "--model", str(out), "--data", f"new={runs['tmp']}/data/new_valid", "--seq-len", "16",
                 "--max-tokens", "128", "--json", str(tmp_path / "a.json")]) == 0
    assert main(["eval", "--model", str(runs[run]), "--data", f"new={runs['tmp']}/data/new_valid", "--seq-len", "16",
                 "--max-tokens", "128", "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text())["new"] for f in ("a.json", "b.json"))
    assert a == b and a["tokens"] == 128
    assert a["loss"] == pytest.approx(final["valid/new/loss"], rel=1e-5)


def test_golden_numbers(runs):
    """Per-step losses, grad norms, LRs and sample fingerprints as recorded before the restructure."""
    check_golden("zero0_x1", runs["single"])
    check_golden("zero3_x2", runs["zero3"])
    check_golden("zero3_x2_resumed", runs["zero3_resumed"])


def _task_records(run_dir) -> dict:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("task/")}
            for r in read_metrics(run_dir) if any(k.startswith("task/") for k in r)}


def test_task_metrics_in_the_loop(runs):
    """Step 0 (the base), every eval.tasks.interval and the last step; _vs_base after step 0;
    2 ZeRO-3 ranks (requests split and gathered) log what one process logs."""
    single, zero3 = _task_records(runs["single"]), _task_records(runs["zero3"])
    assert sorted(single) == sorted(zero3) == [0, 3, 5]
    assert {"task/tiny_choice/acc", "task/tiny_choice/acc_norm", "task/tiny_gen/exact_match",
            "task/tiny_roll/word_perplexity"} == set(single[0])
    assert "task/tiny_roll/word_perplexity_vs_base" in single[5]
    assert single[5]["task/tiny_roll/word_perplexity_vs_base"] == pytest.approx(
        single[5]["task/tiny_roll/word_perplexity"] - single[0]["task/tiny_roll/word_perplexity"])
    assert single[5]["task/tiny_roll/word_perplexity"] != single[0]["task/tiny_roll/word_perplexity"]  # it moved
    for step in single:
        assert zero3[step].keys() == single[step].keys()
        for k, v in single[step].items():
            assert zero3[step][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (step, k)


def test_step0_task_metrics_equal_megacpt_eval_on_the_base_model(runs, tmp_path):
    from megacpt.cli import main

    out = tmp_path / "base.json"
    assert main(["eval", "--model", str(runs["model"]), "--tasks", ",".join(TASK_NAMES), "--include-path",
                 str(runs["tasks"]), "--json", str(out)]) == 0
    got = json.loads(out.read_text())["tasks"]
    base = _task_records(runs["single"])[0]
    for k, v in base.items():
        _, name, metric = k.split("/")
        assert got[name][metric] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_eval_tasks_on_the_run_and_its_export_equal_lm_eval_hf(runs, tmp_path):
    """`megacpt eval --tasks` on the ZeRO-3 run (consolidated) and on its export, against lm-eval's
    own `hf` backend on the export; the last in-loop evaluation is the same model too."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megacpt.cli import main
    from megacpt.eval.tasks import summarize

    hf_dir = tmp_path / "hf"
    assert main(["export", str(runs["zero3"]), "--output", str(hf_dir)]) == 0
    got = {}
    for name, src in (("run", runs["zero3"]), ("export", hf_dir)):
        assert main(["eval", "--model", str(src), "--tasks", ",".join(TASK_NAMES), "--include-path",
                     str(runs["tasks"]), "--json", str(tmp_path / f"{name}.json")]) == 0
        got[name] = json.loads((tmp_path / f"{name}.json").read_text())["tasks"]
    ref = summarize(lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=TASK_NAMES, device="cpu", batch_size=4,
        task_manager=TaskManager(include_path=str(runs["tasks"]), include_defaults=False), bootstrap_iters=1000))
    last = _task_records(runs["zero3"])[5]
    for name in TASK_NAMES:
        for metric, v in ref[name].items():
            assert got["run"][name][metric] == pytest.approx(v, rel=1e-4, abs=1e-6), (name, metric)
            assert got["export"][name][metric] == pytest.approx(v, rel=1e-4, abs=1e-6), (name, metric)
            if "_stderr" not in metric and metric != "n":
                assert last[f"task/{name}/{metric}"] == pytest.approx(v, rel=1e-4, abs=1e-6), (name, metric)


def test_start_warns_when_a_validation_set_overlaps_the_training_data(runs):
    out = runs["from_ckpt_stdout"]
    warned = [ln for ln in out.splitlines() if ln.startswith("warning: eval set valid/")]
    assert len(warned) == 1 and "valid/leak" in warned[0] and "(100.0%)" in warned[0], out[-2000:]
    assert "megacpt contamination" in warned[0]


def _bucket_values(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k.startswith("valid/doc/")}


def test_by_position_step0_equals_megacpt_eval_and_zero3_equals_single(runs, tmp_path):
    """The in-loop by-position set at step 0 is `megacpt eval --by-position` on the base model (same
    windows, buckets and numbers); 2 ZeRO-3 ranks log what one process logs at every evaluation."""
    from megacpt.cli import main

    out = tmp_path / "base.json"
    assert main(["eval", "--model", str(runs["model"]), "--data", f"doc={runs['tmp']}/data/old_valid",
                 "--by-position", str(BY_POSITION["by_position"]), "--seq-len", str(BY_POSITION["seq_len"]),
                 "--max-tokens", "128", "--json", str(out)]) == 0
    ref = json.loads(out.read_text())["doc"]
    buckets = ref["by_position"]["buckets"]
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 16), (16, 32), (32, 48)]
    assert ref["tokens"] == 128 and buckets[0]["tokens"] > buckets[1]["tokens"] > buckets[2]["tokens"]
    want = {"valid/doc/loss": ref["loss"], "valid/doc/ppl": ref["ppl"]}
    for b in buckets:
        want.update({f"valid/doc/pos_{b['start']}_{b['end']}/loss": b["loss"],
                     f"valid/doc/pos_{b['start']}_{b['end']}/ppl": b["ppl"]})
    single = {r["step"]: _bucket_values(r) for r in _final_valid(runs["single"])}
    zero3 = {r["step"]: _bucket_values(r) for r in _final_valid(runs["zero3"])}
    assert sorted(single) == sorted(zero3) == [0, 5]
    assert single[0].keys() == want.keys()
    for k, v in want.items():
        assert single[0][k] == pytest.approx(v, rel=1e-5), k
    for step in (0, 5):
        assert zero3[step].keys() == single[step].keys()
        for k, v in single[step].items():
            assert zero3[step][k] == pytest.approx(v, rel=1e-5), (step, k)
    assert single[5]["valid/doc/pos_0_16/loss"] != single[0]["valid/doc/pos_0_16/loss"]  # training moved it
    assert single[5]["valid/doc/ppl_vs_base"] == pytest.approx(single[5]["valid/doc/ppl"] / ref["ppl"], rel=1e-5)


def test_resume_drops_the_base_of_a_validation_set_whose_windows_changed(runs):
    last = _final_valid(runs["single_resumed"])[-1]
    assert last["step"] == 5
    assert "note: the windows of data.valid doc changed" in runs["single_resumed_stdout"]
    assert "valid/doc/ppl_vs_base" not in last  # the base was measured on 48-token windows
    assert "valid/new/ppl_vs_base" in last and "valid/original/ppl_vs_base" in last
    assert {k for k in last if k.startswith("valid/doc/pos_")} == {
        f"valid/doc/pos_{s}_{e}/{m}" for s, e in ((0, 16), (16, 32), (32, 40)) for m in ("loss", "ppl")}


# ---------------------------------------------------------------------------------------------
# Experiment trackers (logging.backends) and checkpoint manifests, on the single_resumed run.


def _numeric_series(run_dir) -> dict:
    """{key: {step: value}} of every number metrics.jsonl holds (event records aside)."""
    out = {}
    for r in read_metrics(run_dir):
        if "event" in r:
            continue
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, {})[r["step"]] = v
    return out


def _wandb_log(path: Path) -> list[dict]:
    """The records of a W&B transaction log, read by wandb's own reader."""
    wandb_cli = Path(sys.executable).parent / "wandb"
    r = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(path)], capture_output=True, text=True,
                       timeout=120, check=True)
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_trackers_log_what_metrics_jsonl_holds_and_a_resume_continues_their_runs(runs):
    from mlflow.tracking import MlflowClient

    run = runs["single_resumed"]
    want = _numeric_series(run)
    assert {"loss", "lr", "grad_norm", "valid/new/loss", "valid/doc/pos_0_16/loss"} <= want.keys()
    assert sorted(want["loss"]) == [1, 2, 3, 4, 5] and sorted(want["valid/new/loss"]) == [0, 5]
    ids = json.loads((run / "trackers.json").read_text())
    # W&B, offline: one transaction log per launch, both of the same run (the id kept in run_dir).
    logs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and {p.name for p in logs} == {f"run-{ids['wandb']}.wandb"}
    got = {}
    for path in logs:
        records = _wandb_log(path)
        (head,) = [r["run"] for r in records if r["type"] == "run"]
        assert head["run_id"] == ids["wandb"] and head["display_name"] == "single_resumed"
        assert head["config"]["update"]["seed"] == 7 and "cpt" in head["tags"]
        for r in records:
            if r["type"] == "history":
                step = r["history"]["step"]["num"]
                for k, v in r["history"]["item"].items():
                    if not k.startswith("_"):
                        got.setdefault(k, {})[step] = v
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12), k
    # MLflow in run_dir/mlflow.db: one run, continued by the second launch, finished.
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("megacpt").experiment_id])
    assert [r.info.run_id for r in found] == [ids["mlflow"]["run_id"]]
    assert found[0].info.run_name == "single_resumed" and found[0].info.status == "FINISHED"
    assert found[0].data.params["seed"] == "7"
    assert found[0].data.metrics.keys() == want.keys()
    for k in want:
        history = client.get_metric_history(ids["mlflow"]["run_id"], k)
        assert len(history) == len(want[k]) and {m.step: m.value for m in history} == pytest.approx(want[k], rel=1e-12)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def fallback(runs):
    """A copy of single_resumed (checkpoints at steps 3 and 5) with one byte of step 5 flipped,
    resumed: from step 3, with MLflow pointed at a tracking URI that cannot work."""
    run = runs["tmp"] / "fallback"
    shutil.copytree(runs["single_resumed"] / "checkpoints", run / "checkpoints")
    shutil.copy(runs["single_resumed"] / "metrics.jsonl", run / "metrics.jsonl")
    _flip_byte(run / "checkpoints" / "step_00000005" / "mp_rank_00_model_states.pt")
    c = yaml.safe_load(Path(runs["resume_cfg"]).read_text())
    c["run_dir"], c["logging"] = str(run), {"backends": ["mlflow"]}
    path = write_config(runs["tmp"] / "fallback.yaml", c)
    r = launch(1, [str(path), "--set", "data.valid.2.seq_len=40"],
               env=cpu_env(MLFLOW_TRACKING_URI="bogus-scheme://nowhere"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run, r


def test_resume_falls_back_past_a_damaged_checkpoint(runs, fallback, capsys):
    from megacpt.cli import main

    run, r = fallback
    said = [ln for ln in r.stdout.splitlines() if "damaged" in ln]
    assert said == ["warning: checkpoint step_00000005 is damaged: mp_rank_00_model_states.pt does not match its "
                    "BLAKE2b checksum: changed since it was written; resuming from step_00000003, the newest intact "
                    "checkpoint"], r.stdout[-2000:]
    assert f"resuming from {run / 'checkpoints' / 'step_00000003'} at step 3" in r.stdout
    # Steps 4 and 5 trained again from step 3: as the uninterrupted run, bit for bit.
    again = [x for x in read_metrics(run) if "loss" in x and x["step"] >= 4]
    assert [x["step"] for x in again] == [4, 5, 4, 5]
    single = train_losses(runs["single"])
    assert [x["loss"] for x in again[2:]] == [single[4]["loss"], single[5]["loss"]]
    # The tracker that could not start: one warning, and the run finished.
    warned = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: mlflow")]
    assert len(warned) == 1 and "could not start" in warned[0] and "bogus-scheme" in warned[0]
    assert not (run / "mlflow.db").exists()
    capsys.readouterr()
    assert main(["verify", str(run)]) == 0  # step 5 rewritten whole
    assert [ln.split()[0] for ln in capsys.readouterr().out.splitlines()] == ["intact", "intact"]


def test_damaged_or_truncated_checkpoint_is_named_by_export_eval_and_verify(runs, tmp_path, capsys):
    from megacpt.cli import main

    run = tmp_path / "run"
    shutil.copytree(runs["single_resumed"] / "checkpoints", run / "checkpoints")
    step3, step5 = run / "checkpoints" / "step_00000003", run / "checkpoints" / "step_00000005"
    _flip_byte(step5 / "mp_rank_00_model_states.pt")
    rng = step3 / "rng" / "rank_00000.pt"
    size = rng.stat().st_size
    with open(rng, "r+b") as f:
        f.truncate(size - 7)
    capsys.readouterr()
    assert main(["verify", str(run)]) == 2
    cap = capsys.readouterr()
    assert cap.out.splitlines() == [
        f"DAMAGED     step_00000003: rng/rank_00000.pt has {size - 7} bytes, the manifest says {size} (truncated)",
        "DAMAGED     step_00000005: mp_rank_00_model_states.pt does not match its BLAKE2b checksum: changed since "
        "it was written"]
    valid = f"new={runs['tmp']}/data/new_valid"
    for argv, named in ((["export", str(run), "--output", str(tmp_path / "hf")], step5 / "mp_rank_00_model_states.pt"),
                        (["export", str(step3), "--output", str(tmp_path / "hf")], step3 / "rng"),
                        (["eval", "--model", str(step5), "--data", valid, "--json", str(tmp_path / "e.json")],
                         step5 / "mp_rank_00_model_states.pt")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: checkpoint {named.parent} is damaged: ") \
            and named.name in err[0], err
        assert not (tmp_path / "hf").exists() and not (tmp_path / "e.json").exists()


def test_checkpoint_without_manifest_loads_with_a_warning(runs, tmp_path, capsys):
    """Checkpoints written before manifests existed: export and verify read them, saying so once."""
    from megacpt.cli import main
    from megacpt.models.hf import HFWeights

    old = tmp_path / "old"
    shutil.copytree(runs["single_resumed"] / "checkpoints" / "step_00000005", old)
    (old / "manifest.json").unlink()
    capsys.readouterr()
    assert main(["export", str(old), "--output", str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {old} has no manifest.json (written before checkpoints had one): loading it unverified"]
    assert main(["export", str(runs["single_resumed"]), "--output", str(tmp_path / "ref")]) == 0
    a, b = HFWeights(tmp_path / "hf"), HFWeights(tmp_path / "ref")
    assert all(torch.equal(a.get(k), b.get(k)) for k in b.keys())
    capsys.readouterr()
    assert main(["verify", str(old)]) == 0
    assert capsys.readouterr().out.startswith("unverified  old: no manifest.json")

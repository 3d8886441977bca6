"""Data order through the trainer: the samples seen (per-step fingerprints) do not depend on the
number of ranks, on where a run was interrupted, or on whether a phase was declared up front or
appended after the run had finished."""

import pytest
import torch

from helpers import run_ok, tiny_hf_model, tiny_run_config, train_losses, write_config
from golden import check_golden

pytestmark = pytest.mark.slow

ANNEAL = {"name": "anneal", "steps": 3, "schedule": {"kind": "linear", "warmup_steps": 0},
          "data": {"train": [{"name": "replay", "path": None, "weight": 0.5},
                             {"name": "new", "path": None, "weight": 0.5}]}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    model = tiny_hf_model(tmp / "model", arch="qwen2", tied=True)
    out = {"tmp": tmp}

    def phased(name, with_phase):
        c = tiny_run_config(tmp, model, tmp / name, steps=3, zero=0, **{"data.document_mask": True,
                                                                         "data.mask_eos_loss": True})
        if with_phase:
            anneal = dict(ANNEAL)
            anneal["data"] = {"train": [dict(s, path=str(tmp / "data" / ("old" if s["name"] == "replay" else "new")))
                                        for s in ANNEAL["data"]["train"]]}
            c["phases"] = [anneal]
        return write_config(tmp / f"{name}-{int(with_phase)}.yaml", c)

    run_ok(1, phased("phased_full", True))
    out["phased_full"] = tmp / "phased_full"
    # Interrupted inside the main phase, finished without knowing of the anneal, then the anneal
    # appended and interrupted inside it.
    run_ok(1, phased("phased_split", False), "train.stop_after=2")
    run_ok(1, phased("phased_split", False))
    run_ok(1, phased("phased_split", True), "train.stop_after=1")
    run_ok(1, phased("phased_split", True))
    out["phased_split"] = tmp / "phased_split"

    # Data-parallel size changes on resume: 2 ranks for 2 steps, then 1 rank (ZeRO-0 state is whole).
    def plain(name):
        return write_config(tmp / f"{name}.yaml", tiny_run_config(tmp, model, tmp / name, steps=5, zero=0))

    run_ok(1, plain("one_rank"))
    c = plain("two_then_one")
    run_ok(2, c, "train.stop_after=2")
    # The allocator is resume-safe: the second half runs with malloc's defaults.
    run_ok(1, c, "train.cpu_allocator=system")
    out["one_rank"], out["two_then_one"] = tmp / "one_rank", tmp / "two_then_one"
    # The same with ZeRO-3 partitions, resharded from 2 ranks to 1 through a universal checkpoint.
    c = write_config(tmp / "z3_two_then_one.yaml",
                     tiny_run_config(tmp, model, tmp / "z3_two_then_one", steps=5, zero=3,
                                     deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    run_ok(2, c, "train.stop_after=2")
    r = run_ok(1, c)
    assert "resharding checkpoint from 2 to 1 ranks" in r.stdout
    out["z3_two_then_one"] = tmp / "z3_two_then_one"
    return out


def test_phase_declared_later_equals_declared_up_front(runs):
    a, b = train_losses(runs["phased_full"]), train_losses(runs["phased_split"])
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in range(1, 7):
        assert a[s]["samples_fingerprint"] == b[s]["samples_fingerprint"], s
        assert a[s]["loss"] == b[s]["loss"], s
        assert a[s]["lr"] == b[s]["lr"], s
        assert a[s]["phase"] == b[s]["phase"] == ("main" if s <= 3 else "anneal")
    # The anneal really switched blend and schedule: replay share rises, LR decays linearly to min_lr.
    assert a[6]["tokens/replay"] - a[3]["tokens/replay"] > a[3]["tokens/replay"]
    assert a[6]["lr"] < a[5]["lr"] < a[4]["lr"]


@pytest.mark.parametrize("resumed", ["two_then_one", "z3_two_then_one"])
def test_resume_on_fewer_ranks_sees_the_same_samples(runs, resumed, tmp_path):
    a, b = train_losses(runs["one_rank"]), train_losses(runs[resumed])
    assert [a[s]["samples_fingerprint"] for s in range(1, 6)] == [b[s]["samples_fingerprint"] for s in range(1, 6)]
    assert len({a[s]["samples_fingerprint"] for s in range(1, 6)}) == 5
    la = torch.tensor([a[s]["loss"] for s in range(1, 6)], dtype=torch.float64)
    lb = torch.tensor([b[s]["loss"] for s in range(1, 6)], dtype=torch.float64)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    assert [a[s]["tokens/new"] for s in range(1, 6)] == [b[s]["tokens/new"] for s in range(1, 6)]
    import json

    caching = json.loads((runs[resumed] / "config.resolved.json").read_text())["caching_malloc"]
    assert caching is (resumed != "two_then_one")  # train.cpu_allocator: system vs the caching default
    # and the final weights are equivalent (export both and compare)
    from megacpt.cli import main
    from megacpt.models.hf import HFWeights

    for name in ("one_rank", resumed):
        assert main(["export", str(runs[name]), "--output", str(tmp_path / name)]) == 0
    wa, wb = HFWeights(tmp_path / "one_rank"), HFWeights(tmp_path / resumed)
    assert set(wa.keys()) == set(wb.keys())
    for k in wa.keys():
        torch.testing.assert_close(wb.get(k), wa.get(k), rtol=1e-4, atol=1e-5)


def test_changing_an_existing_phase_is_refused(runs, capsys):
    from megacpt.cli import main

    cfg = runs["tmp"] / "phased_split-1.yaml"
    rc = main(["train", str(cfg), "--set", "phases.0.steps=5"])
    assert rc == 2
    assert "existing phases changed" in capsys.readouterr().err


def test_tied_export_reloads_with_the_same_perplexity(runs, tmp_path):
    """The tied Qwen2 model of the ZeRO-3 run (tests/test_train_zero.py covers untied Llama)."""
    import json
    import math

    import transformers

    from megacpt.cli import main
    from megacpt.eval.perplexity import eval_windows

    run, data = runs["z3_two_then_one"], runs["tmp"] / "data" / "old_valid"
    out = tmp_path / "hf"
    assert main(["export", str(run), "--output", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.tie_word_embeddings
    w = torch.from_numpy(eval_windows(data, 16, 256))
    with torch.no_grad():
        logits = model(w[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), w[:, 1:].reshape(-1))
    assert main(["eval", "--model", str(run), "--data", f"old={data}", "--seq-len", "16", "--max-tokens", "256",
                 "--json", str(tmp_path / "e.json")]) == 0
    ours = json.loads((tmp_path / "e.json").read_text())["old"]
    assert ours["tokens"] == 256 and math.exp(float(loss)) == pytest.approx(ours["ppl"], rel=1e-3)


def test_golden_numbers(runs):
    """A two-phase run resumed inside and across the phase boundary, and a ZeRO-3 run resharded
    from 2 ranks to 1, as recorded before the restructure."""
    check_golden("two_phase_resumed", runs["phased_split"])
    check_golden("zero3_2_then_1", runs["z3_two_then_one"])


def test_universal_checkpoint_has_its_own_manifest(runs, tmp_path, capsys):
    """The universal/ folder made for the 2 → 1 rank resume, after step 2 was published, gets a
    manifest of its own; a damaged one is converted again from the (intact) checkpoint."""
    import json
    import shutil

    from megacpt.cli import main
    from megacpt.train import checkpoint as ckpt
    from megacpt.train import manifest

    step2 = runs["z3_two_then_one"] / "checkpoints" / "step_00000002"
    universal = step2 / ckpt.UNIVERSAL
    assert (universal / manifest.MANIFEST).is_file()
    listed = json.loads((step2 / manifest.MANIFEST).read_text())["files"]
    assert listed and not any(n.startswith(ckpt.UNIVERSAL) for n in listed)
    capsys.readouterr()
    assert main(["verify", str(runs["z3_two_then_one"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[:2] for ln in lines] == [["intact", "step_00000002:"], ["intact", "step_00000002/universal:"],
                                                ["intact", "step_00000005:"]]
    copy = tmp_path / "step_00000002"
    shutil.copytree(step2, copy)
    victim = max((p for p in (copy / ckpt.UNIVERSAL).rglob("*") if p.is_file() and p.name != manifest.MANIFEST),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-1])
    assert manifest.check(copy / ckpt.UNIVERSAL).problem.endswith("(truncated)")
    assert ckpt.make_universal(copy) == copy / ckpt.UNIVERSAL
    assert manifest.check(copy / ckpt.UNIVERSAL).intact
    assert manifest.file_digest(victim) == manifest.file_digest(universal / victim.relative_to(copy / ckpt.UNIVERSAL))

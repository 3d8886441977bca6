"""Sequence length and batch size per phase: a short-context main phase, then a phase at twice the
length (and another that also changes the micro-batch). DeepSpeed fixes the accumulation steps at
initialize, so these runs show that the trainer tells it, that resuming just before and just after
the boundary is bit-identical to the uninterrupted run, and that 2 ZeRO-3 ranks (another number of
accumulation steps in every phase) equal one process. All with document masking (segments are cut
at each phase's length too)."""

import json

import pytest

from helpers import (assert_refused, assert_runs_match, run_ok, tiny_hf_model, tiny_run_config, train_losses,
                     write_config)

pytestmark = pytest.mark.slow

# main: 16 tokens × 2 sequences (accumulation 2 on one rank, 1 on two); long: 32 × 4 (4 / 2), so
# DeepSpeed's micro-step counter (6 or 3 at the boundary) is not a multiple of the new
# accumulation; long_mb: 32 × 4 in micro-batches of 2.
PHASES = [{"name": "long", "steps": 3, "seq_len": 32, "global_batch_size": 4},
          {"name": "long_mb", "steps": 2, "micro_batch_size": 2}]
SEQ = {"main": 16, "long": 32, "long_mb": 32}
GB = {"main": 2, "long": 4, "long_mb": 4}
STEPS = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seqphases")
    model = tiny_hf_model(tmp / "model", max_pos=64)
    out = {"tmp": tmp, "model": model}

    def cfg(name, zero):
        c = tiny_run_config(tmp, model, tmp / name, steps=3, zero=zero, gb=2, mb=1, **{"data.document_mask": True})
        c["phases"] = PHASES
        if zero == 3:
            c["deepspeed"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
        out[name] = tmp / name
        return write_config(tmp / f"{name}.yaml", c)

    run_ok(1, cfg("full", 0))
    # Stopped one step before the boundary (step 2), again one step after it (step 4), then finished.
    c = cfg("split", 0)
    run_ok(1, c, "train.stop_after=2")
    run_ok(1, c, "train.stop_after=2")
    run_ok(1, c)
    run_ok(2, cfg("zero3", 3))
    return out


def test_resume_around_the_boundary_is_bit_identical(runs):
    a, b = train_losses(runs["full"]), train_losses(runs["split"])
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for s in a:
        for key in ("loss", "lr", "grad_norm", "samples_fingerprint", "consumed_samples", "phase", "tokens/new"):
            assert a[s][key] == b[s][key], (s, key)
    assert len({a[s]["samples_fingerprint"] for s in a}) == STEPS


def test_each_phase_trains_at_its_length_and_batch(runs):
    from megacpt.models.hf import args_from_hf_config

    recs = train_losses(runs["full"])
    args = args_from_hf_config(json.loads((runs["model"] / "config.json").read_text()))
    consumed = 0
    for s in range(1, STEPS + 1):
        r = recs[s]
        S, G = SEQ[r["phase"]], GB[r["phase"]]
        consumed += G
        assert r["seq_len"] == S
        assert r["consumed_samples"] == consumed
        # Tokens drawn per step are the phase's S × G (the blend splits them between sources).
        if s > 1:
            drawn = sum(r[k] - recs[s - 1][k] for k in ("tokens/new", "tokens/replay"))
            assert drawn == S * G, s
        # FLOPs per token (and so MFU) follow the phase's length.
        ratio = r["tflops_per_device"] * 1e12 / r["tokens_per_s_per_device"]
        assert ratio == pytest.approx(args.flops_per_token(S), rel=1e-9)
    assert [recs[s]["phase"] for s in (3, 4, 6, 7)] == ["main", "long", "long", "long_mb"]


def test_two_zero3_ranks_equal_one_process_across_phases(runs):
    assert_runs_match(runs["full"], runs["zero3"], range(1, STEPS + 1))


def test_report_counts_tokens_phase_by_phase(runs):
    from megacpt.config import config_from_dict, tokens_at
    from megacpt.report import load_run

    run = load_run(runs["full"])
    cfg = config_from_dict(json.loads((runs["full"] / "config.resolved.json").read_text())["config"])
    recs = train_losses(runs["full"])
    for s in range(1, STEPS + 1):
        expected = sum(SEQ[recs[k]["phase"]] * GB[recs[k]["phase"]] for k in range(1, s + 1))
        assert run.tokens(s) == tokens_at(cfg, s) == expected


@pytest.mark.parametrize("sets, message", [
    (["phases.0.seq_len=128"], "phase long: seq_len 128 exceeds the model's max_position_embeddings 64"),
    # long_mb inherits the 3 and cannot split it into micro-batches of 2.
    (["phases.0.global_batch_size=3"], "phases.1 (long_mb): global_batch_size (3) is not a multiple of "
                                       "micro_batch_size (2)"),
    (["phases.1.micro_batch_size=3"], "phases.1 (long_mb): global_batch_size (4) is not a multiple of "
                                      "micro_batch_size (3)"),
    (["phases.0.seq_len=0"], "phases.0.seq_len must be > 0"),
    (["parallel.pp=2"], "phase long changes seq_len or the batch size, which pipeline parallelism"),
])
def test_bad_phase_shapes_are_refused_before_any_rank_starts(runs, sets, message, capsys):
    argv = ["train", str(runs["tmp"] / "full.yaml"), "--set", f"run_dir={runs['tmp'] / 'refused'}"]
    for s in sets:
        argv += ["--set", s]
    assert_refused(capsys, argv, message, runs["tmp"] / "refused")

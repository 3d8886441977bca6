"""precision: fp8 (megacpt/train/float8.py): one-line refusals where it cannot run, torchao's
conversion of the block linears (on CPU when torchao is importable), and on an fp8 GPU a short
run that must track the bf16 run."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from helpers import launch, tiny_hf_model, tiny_run_config, train_losses, write_config, write_shard
from megacpt.cli import main
from megacpt.train.float8 import float8_problem

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8")
    model = tiny_hf_model(tmp / "model", max_pos=64)
    return tmp, model


def _refused(capsys, argv, fragment, never_written):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert not never_written.exists(), "a refused run must leave nothing behind"


def _config(tmp_path, base, **over):
    tmp, model = base
    cfg = tiny_run_config(tmp, model, tmp_path / "run", precision="fp8", **over)
    return write_config(tmp_path / "fp8.yaml", cfg)


def test_machine_refusals_are_one_line_each():
    cpu = float8_problem(False, "cpu", None, None)
    a100 = float8_problem(True, "NVIDIA A100-SXM4-80GB", (8, 0), None)
    no_ao = float8_problem(True, "NVIDIA H100 80GB HBM3", (9, 0), "ModuleNotFoundError: No module named 'torchao'")
    for msg, fragment in ((cpu, "needs a CUDA GPU"), (a100, "has 8.0"), (no_ao, "pip install torchao==")):
        assert msg and fragment in msg and "\n" not in msg and "precision: bf16" in msg
    assert float8_problem(True, "NVIDIA L40S", (8, 9), None) is None
    assert float8_problem(True, "NVIDIA H100 80GB HBM3", (9, 0), None) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_train_refuses_fp8_on_cpu(tmp_path, base, capsys):
    _refused(capsys, ["train", str(_config(tmp_path, base))], "needs a CUDA GPU", tmp_path / "run")


@pytest.mark.parametrize("sets,fragment", [
    (["parallel.zero_stage=3"], "ZeRO-3"),
    (["parallel.tp=2"], "tensor parallelism"),
    (["parallel.pp=2"], "pipeline parallelism"),
    (["adapter.r=4"], "an adapter"),
])
def test_train_refuses_fp8_with_layouts_it_was_not_written_for(tmp_path, base, capsys, sets, fragment):
    argv = ["train", str(_config(tmp_path, base))]
    for s in sets:
        argv += ["--set", s]
    _refused(capsys, argv, fragment, tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_bench_train_refuses_fp8(tmp_path, capsys):
    work = tmp_path / "work"
    base = ["bench", "train", "--model", "tiny", "--precision", "fp8", "--work-dir", str(work)]
    _refused(capsys, base, "needs a CUDA GPU", work)
    _refused(capsys, base + ["--peers", "a"], "runs megacpt alone", work)


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (pip install megacpt[fp8])")
def test_conversion_keeps_head_and_small_linears_in_bf16():
    """torchao's float8 linears run on CPU too (torch's reference fp8 matmul): the swap, the
    names, and a loss close to the bf16 model's on the same weights."""
    from megacpt.models.llama import ModelArgs, Transformer
    from megacpt.train.float8 import convert_float8

    args = ModelArgs(vocab_size=512, hidden_size=256, intermediate_size=2048, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=64, max_position_embeddings=128)
    torch.manual_seed(0)
    model = Transformer(args).to(torch.bfloat16)
    names = list(model.state_dict())
    ids = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        ref = model(ids, labels=ids).float()
    converted = convert_float8(model, say=lambda _: None)
    # torchao's tensorwise filter: gate/up (256 → 2048) convert; q/k/v/o (≤ 256 outputs) and
    # down (2048 → 256) are below its size thresholds; the head is ours, never a candidate.
    assert sorted(converted) == sorted(f"layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj"))
    assert type(model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert list(model.state_dict()) == names  # checkpoints of fp8 and bf16 runs are interchangeable
    loss = model(ids, labels=ids)
    loss.backward()
    assert model.layers[0].mlp.gate_proj.weight.grad is not None
    assert model.layers[0].mlp.gate_proj.weight.dtype == torch.bfloat16
    assert abs(loss.item() - ref.item()) < 0.02 * abs(ref.item())


@pytest.mark.gpu
@pytest.mark.skipif(not (FP8_GPU and HAS_TORCHAO), reason="needs a GPU of compute capability ≥ 8.9 and torchao")
def test_fp8_run_tracks_bf16(tmp_path):
    """A short run with fp8 linears stays within a loose tolerance of the same run in bf16 (fp8
    numerics differ; a broken scale or a lost gradient would not stay this close). The tokens
    count up by one, so both runs learn fast. On CPU, with the machine check bypassed, the same
    runs stayed within 1 % of each other at every step."""
    model = tiny_hf_model(tmp_path / "model", vocab=128, hidden=256, inter=2048, heads=4, kv_heads=2, max_pos=64)
    counting = write_shard(tmp_path / "data" / "counting", [np.arange(s, s + 60) % 127 for s in range(80)])
    losses = {}
    for precision in ("bf16", "fp8"):
        run = tmp_path / f"run-{precision}"
        cfg = tiny_run_config(tmp_path, model, run, steps=20, zero=1, seq=32, precision=precision)
        cfg["data"].update(train=[{"name": "counting", "path": counting, "weight": 1.0}], valid=[])
        r = launch(1, [str(write_config(tmp_path / f"{precision}.yaml", cfg))])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        recs = train_losses(run)
        losses[precision] = [recs[s]["loss"] for s in sorted(recs)]
        if precision == "fp8":
            assert "4 of 14 linears in float8" in r.stdout + r.stderr
            assert all(recs[s].get("precision") == "fp8" for s in recs)
    bf16, fp8 = losses["bf16"], losses["fp8"]
    assert len(bf16) == len(fp8) == 20
    assert fp8[-1] < fp8[0] - 1.0, json.dumps(fp8)  # it learns
    for a, b in zip(bf16, fp8):
        assert abs(a - b) < 0.05 * a, (bf16, fp8)

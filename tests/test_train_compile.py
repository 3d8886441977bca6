"""`model.compile: true` (torch.compile per decoder block) trains like eager mode."""

import pytest
import torch

from helpers import run_ok, tiny_hf_model, tiny_run_config, train_losses, write_config

pytestmark = pytest.mark.slow


def test_compiled_blocks_match_eager(tmp_path):
    model = tiny_hf_model(tmp_path / "model")
    runs = {}
    # ZeRO-3 over 2 ranks (same global batch, 2 micro-batches each) compiles the pointwise code
    # only; it is compared with the same eager one-process run as the compiled blocks.
    for name, nproc, zero, compiled in (("eager", 1, 1, False), ("compiled", 1, 1, True),
                                        ("zero3-pointwise", 2, 3, True)):
        c = tiny_run_config(tmp_path, model, tmp_path / name, steps=3, zero=zero,
                            **{"model.compile": compiled, "model.activation_checkpointing": compiled})
        r = run_ok(nproc, write_config(tmp_path / f"{name}.yaml", c))
        assert ("torch.compile: 2 decoder blocks" in r.stdout) == (name == "compiled")
        assert ("torch.compile: pointwise code (RMSNorm, RoPE, SwiGLU) of 9 modules in 2 decoder blocks and the "
                "final norm; linears stay eager" in r.stdout) == (name == "zero3-pointwise")
        recs = train_losses(tmp_path / name)
        runs[name] = {k: [recs[s][k] for s in sorted(recs)] for k in ("loss", "grad_norm")}
        assert len(runs[name]["loss"]) == 3
    # Inductor fuses and reorders float ops, so not bit-identical, but the same training.
    for name in ("compiled", "zero3-pointwise"):
        torch.testing.assert_close(torch.tensor(runs[name]["loss"]), torch.tensor(runs["eager"]["loss"]),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(runs[name]["grad_norm"]),
                                   torch.tensor(runs["eager"]["grad_norm"]), rtol=1e-4, atol=1e-6)


def _tiny_model(seed=0):
    from megacpt.models.llama import ModelArgs, Transformer

    torch.manual_seed(seed)
    return Transformer(ModelArgs(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                                 num_heads=4, num_kv_heads=2, head_dim=16))


def test_compile_pointwise_matches_eager_in_fp32_and_bf16():
    import copy

    from megacpt.models import llama

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = _tiny_model()
    compiled = copy.deepcopy(eager)
    # 5 norms (2 per block + final), 2 attentions (RoPE), 2 MLPs; a second call changes nothing.
    assert llama.compile_pointwise(compiled) == 9
    assert llama.compile_pointwise(compiled) == 0
    for m in compiled.modules():
        for attr in llama.POINTWISE_FNS:
            if attr in m.__dict__:
                assert hasattr(getattr(m, attr), "_torchdynamo_orig_callable"), (type(m).__name__, attr)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    for model in (eager, compiled):
        model(ids, ids.clone()).backward()
    # rms_norm, rope_qk, swiglu
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)

    # bf16: inductor keeps the intermediates of a fused loop in fp32, eager rounds after every op,
    # so the two differ; the compiled loss must be no further from the fp32 loss than eager's.
    ref = eager(ids, ids.clone()).item()
    losses = [m.to(torch.bfloat16)(ids, ids.clone()).item() for m in (eager, compiled)]
    assert abs(losses[1] - ref) <= 2 * abs(losses[0] - ref) + 1e-3 * abs(ref), (ref, losses)


def test_sequence_parallel_norm_uses_the_compiled_function():
    from megacpt.models import llama
    from megacpt.parallel.tp import SequenceParallelRMSNorm

    norm = llama.RMSNorm(8, 1e-6)
    llama.compile_pointwise(norm)
    sp = SequenceParallelRMSNorm(norm, group=None)
    assert sp.norm_fn is norm.norm_fn and hasattr(sp.norm_fn, "_torchdynamo_orig_callable")
    # The trainer's order: apply_tp wraps the norms first, compile_pointwise runs after.
    sp = SequenceParallelRMSNorm(llama.RMSNorm(8, 1e-6), group=None)
    assert sp.norm_fn is llama.rms_norm
    assert llama.compile_pointwise(sp) == 1 and hasattr(sp.norm_fn, "_torchdynamo_orig_callable")

"""Where a training step's GPU time goes, without DeepSpeed: forward+backward of megacpt's model and
of transformers' model on the same shape, the LM-head loss alone, and AdamW variants on fp32
masters. Prints a table and the top CUDA kernels; writes JSON. Needs CUDA.

    python bench/profile_gpu.py --shape llama3-1b --seq-len 4096 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import time


def timed(fn, steps: int, warmup: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> int:
    import torch

    from megacpt.bench.shapes import SHAPES
    from megacpt.models.hf import args_from_hf_config
    from megacpt.models.llama import Transformer

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-1b")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    dev = torch.device("cuda")
    hf_cfg = dict(SHAPES[a.shape])
    args = args_from_hf_config(hf_cfg, source=a.shape)
    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(args).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    B, S = a.micro_batch, a.seq_len
    ids = torch.randint(0, args.vocab_size, (B, S), device=dev)
    flops_tok = args.flops_per_token(S)
    peak = 989e12
    out: dict = {"shape": a.shape, "seq_len": S, "micro_batch": B, "params": n_params,
                 "device": torch.cuda.get_device_name(), "torch": torch.__version__, "ms": {}}

    def fwd_bwd():
        loss = model(ids, labels=ids) / (B * S)
        loss.backward()

    out["ms"]["megacpt_fwd_bwd"] = timed(fwd_bwd, a.steps, 2) * 1e3

    def fwd_only():
        with torch.no_grad():
            model(ids, labels=ids)

    out["ms"]["megacpt_fwd_nograd"] = timed(fwd_only, a.steps, 1) * 1e3

    model.activation_checkpointing = False
    layers = list(model.layers)
    for l in layers:
        l.compile()
    try:
        out["ms"]["megacpt_fwd_bwd_compiled_blocks"] = timed(fwd_bwd, a.steps, 3) * 1e3
    except Exception as e:  # report, keep going
        out["compile_error"] = repr(e)[:500]
    for l in layers:
        l._compiled_call_impl = None

    # The head alone (hidden → loss), ours vs eager.
    from megacpt.kernels import linear_cross_entropy

    h = torch.randn(B * S, args.hidden_size, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = model.lm_head.weight
    tgt = ids.reshape(-1)

    def head_ours():
        linear_cross_entropy(h, w, tgt, reduction="sum").backward()

    def head_triton():
        linear_cross_entropy(h, w, tgt, reduction="sum", impl="triton").backward()

    def head_torch():  # the chunk loop with eager pointwise ops (auto's CUDA path before the Triton pass)
        linear_cross_entropy(h, w, tgt, reduction="sum", impl="torch").backward()

    def head_eager():
        torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(), tgt,
                                          reduction="sum").backward()

    for name, fn in (("head_ours_auto", head_ours), ("head_ours_torch", head_torch),
                     ("head_ours_triton", head_triton), ("head_eager", head_eager)):
        out["ms"][name] = timed(fn, a.steps, 1) * 1e3
    # The chunk budget (CHUNK_ELEMS_CUDA is 2^27) of both chunk loops: eager ops and the Triton pass.
    for impl, label in (("torch", "chunk"), ("chunked-triton", "pass_chunk")):
        for log2 in (25, 26, 27, 28):
            def head_chunk(e=1 << log2, impl=impl):
                linear_cross_entropy(h, w, tgt, reduction="sum", impl=impl, _chunk_elems=e).backward()
            out["ms"][f"head_ours_{label}_2^{log2}"] = timed(head_chunk, a.steps, 1) * 1e3
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            head_chunk()
            out[f"head_ours_{label}_2^{log2}_peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20

    # Optimizer on fp32 masters of the same size.
    masters = [p.detach().float().requires_grad_() for p in model.parameters()]
    for m in masters:
        m.grad = torch.randn_like(m) * 1e-3
    for name, kw in (("adamw_foreach", dict(foreach=True)), ("adamw_fused", dict(fused=True))):
        opt = torch.optim.AdamW(masters, lr=1e-4, **kw)
        out["ms"][name] = timed(opt.step, a.steps, 1) * 1e3
        del opt
    del masters
    torch.cuda.empty_cache()

    # transformers' model on the same shape (sdpa attention, its own loss).
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(**{k: v for k, v in hf_cfg.items() if k != "model_type"},
                                   model_type=hf_cfg["model_type"])
        with torch.device(dev):
            hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)

        def hf_fwd_bwd():
            hf(input_ids=ids, labels=ids).loss.backward()

        out["ms"]["hf_fwd_bwd"] = timed(hf_fwd_bwd, a.steps, 2) * 1e3
        del hf
    except Exception as e:
        out["hf_error"] = repr(e)[:500]
    torch.cuda.empty_cache()

    # Top kernels of megacpt's forward+backward.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            fwd_bwd()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    out["top_kernels"] = table
    for k, v in out["ms"].items():
        extra = ""
        if k.startswith("megacpt_fwd_bwd") or k == "hf_fwd_bwd":
            mfu = flops_tok * B * S / (v / 1e3) / peak
            extra = f"  (model FLOPs at {mfu:.1%} of 989 TFLOP/s)"
        print(f"{k:<34} {v:9.1f} ms{extra}")
    print(table)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`megacpt bench train` / `megacpt bench memory`: smoke runs that check the JSON, never the speed;
the communication estimate and the named shapes against hand counts."""

import json
import subprocess
import sys

import pytest

from helpers import REPO, cpu_env

from megacpt.bench.comm import CommSetup, comm_estimate, comm_estimate_layout, stage_numels
from megacpt.bench.report import percentile, step_stats


def _megacpt(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "megacpt", *args], env=cpu_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_comm_estimate_hand_count():
    # ZeRO-3, 2 ranks, fp32: one 200k-element matrix (partitioned) and one 50-element norm
    # (below the persistence threshold). Small model: parameters stay gathered from forward to
    # backward (reuse distance 2 × 200k < 1e9), so all-gather + reduce-scatter: 2 × 200000 × 4 × ½,
    # plus the norm's gradient all-reduce 2 × 50 × 4 × ½, per micro-batch.
    est = comm_estimate(3, 2, [200_000, 50], 4, 1, persistence_threshold=100_000)
    assert est["bytes_per_step"] == 800_000 + 200 and est["estimate"] is True
    assert comm_estimate(3, 2, [200_000, 50], 4, 3)["bytes_per_step"] == 3 * (800_000 + 200)
    # Reuse distance 0: everything is re-gathered for the backward (3 transfers); 200k: half of it.
    assert comm_estimate(3, 2, [200_000, 50], 4, 1, max_reuse_distance=0)["bytes_per_step"] == 1_200_000 + 200
    assert comm_estimate(3, 2, [200_000, 50], 4, 1, max_reuse_distance=200_000)["bytes_per_step"] == 1_000_000 + 200
    # 4 ranks move (W-1)/W = ¾ of the bytes; stage 0 all-reduces gradients once (2 × ¾ × P × b).
    assert comm_estimate(0, 4, [1000], 2, 5)["bytes_per_step"] == 2 * 1000 * 2 * 3 // 4
    assert comm_estimate(2, 4, [1000], 2, 2)["bytes_per_step"] == 3 * 1000 * 2 * 3 // 4
    assert comm_estimate(3, 1, [1000], 4, 1)["bytes_per_step"] == 0


def test_comm_estimate_per_group_hand_count():
    from megacpt.models.llama import ModelArgs

    a = ModelArgs(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, tie_word_embeddings=True)
    # tp=2 × pp=2 × dp=2, ZeRO-1, fp32, seq 16, micro-batch 1, 4 micro-batches; stages: embedding +
    # layer 0 | layer 1 + norm + head (the tied copy). A = 16·32 = 512 elements, 2048 bytes.
    est = comm_estimate_layout(a, CommSetup(zero_stage=1, dp=2, tp=2, pp=2, seq_len=16, micro_batch=1,
                                            bytes_per_elem=4, grad_accum=4))
    g = est["per_group"]
    # tp all-reduce of B bytes: 2·B·½ = B per rank. Stage 0: 4 per layer + the embedding's = 5 × A;
    # stage 1: 4 + the head input gradient = 5 × A, + 3 fp32 loss statistics per token (16 tokens).
    assert est["per_stage"][0]["tp"] == 4 * 5 * 2048 and est["per_stage"][1]["tp"] == 4 * (5 * 2048 + 3 * 16 * 4)
    # pp: stage 0 sends activations + position and segment ids (2 × 16 int64) each micro-batch,
    # stage 1 the input gradient; both all-reduce the tied embedding gradient (64 × 32 fp32 over 2 ranks).
    assert est["per_stage"][0]["pp"] == 4 * (2048 + 256) + 64 * 32 * 4
    assert est["per_stage"][1]["pp"] == 4 * 2048 + 64 * 32 * 4
    # dp: ZeRO-1 on each stage's own parameters (tp slices): 3·P·b·½.
    stage0 = 2 * (16 * 32) + 2 * (8 * 32) + 3 * (32 * 32) + 2 * 32 + 64 * 32  # q,o + k,v + mlp + norms + embed
    assert est["per_stage"][0]["dp"] == 3 * stage0 * 4 // 2
    assert g["dp"]["size"] == g["tp"]["size"] == g["pp"]["size"] == 2
    assert est["bytes_per_step"] == max(sum(r.values()) for r in est["per_stage"])
    assert all(k in g[n] for n in ("dp", "tp", "pp") for k in ("bytes_per_step", "formula"))


def test_step_stats():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 25) == pytest.approx(1.75)
    st = step_stats([1.0, 2.0, 3.0, 4.0, 5.0])
    assert st["median_s"] == 3.0 and st["min_s"] == 1.0 and st["max_s"] == 5.0 and st["n"] == 5
    assert st["p10_s"] == pytest.approx(1.4) and st["p90_s"] == pytest.approx(4.6)


@pytest.mark.parametrize("name,params", [
    ("smollm2-135m", 134_515_008),     # HuggingFaceTB/SmolLM2-135M
    ("qwen2-0.5b", 494_032_768),       # Qwen/Qwen2.5-0.5B
    ("llama3-1b", 1_235_814_400),      # meta-llama/Llama-3.2-1B
    ("llama3-8b", 8_030_261_248),      # meta-llama/Llama-3.1-8B
])
def test_shapes_match_published_parameter_counts(name, params):
    from megacpt.bench.shapes import hf_config
    from megacpt.models.hf import args_from_hf_config

    assert args_from_hf_config(hf_config(name)).num_params() == params


def test_shape_builds_a_loadable_hf_dir(tmp_path):
    import transformers

    from megacpt.bench.shapes import resolve_model
    from megacpt.models.hf import args_from_hf_config, read_hf_config

    hf_dir, shape = resolve_model("tiny", cache_dir=tmp_path)
    assert shape == "tiny" and (hf_dir / "model.safetensors").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert sum(p.numel() for p in model.parameters()) == args_from_hf_config(read_hf_config(hf_dir)).num_params()
    assert resolve_model("tiny", cache_dir=tmp_path)[0] == hf_dir  # built once, then reused


def test_bad_model_is_a_one_line_error(tmp_path):
    r = _megacpt("bench", "train", "--model", str(tmp_path / "nope"), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("item", ["NOVALUE", "1X=2", "OMP_NUM_THREADS=4"])
def test_bad_env_is_a_one_line_error(item, capsys):
    from megacpt.cli import main

    assert main(["bench", "train", "--model", "tiny", "--env", item]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --env") and len(err.splitlines()) == 1


@pytest.mark.slow
def test_bench_train_smoke_with_peers(tmp_path):
    out = tmp_path / "train.json"
    r = _megacpt("bench", "train", "--model", "tiny", "--seq-len", "32", "--steps", "2", "--warmup", "1",
                 "--nproc", "2", "--zero-stage", "3", "--peers", "--repeats", "1", "--json", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--env", "MEGACPT_BENCH_PROBE=a=b")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert "megacpt" in r.stdout and "hf-trainer" in r.stdout  # the table
    assert d["environment"]["MEGACPT_BENCH_PROBE"] == "a=b" and "MEGACPT_BENCH_PROBE=a=b" in r.stdout
    assert d["megacpt_caching_malloc"] is True  # train.cpu_allocator: caching, on glibc
    assert d["benchmark"] == "train" and d["device"].startswith("cpu") and d["cuda"] is False
    for k in ("torch", "deepspeed", "transformers", "megacpt_commit"):
        assert d["versions"][k]
    assert d["command"].startswith("megacpt bench train") and "--peers" in d["command"]
    s = d["setup"]
    assert (s["nproc"], s["zero_stage"], s["precision"], s["global_batch"], s["tokens_per_step"]) == (2, 3, "fp32", 2, 64)
    assert d["deepspeed_config"]["zero_optimization"]["stage"] == 3
    assert d["megacpt_config"]["data"]["seq_len"] == 32
    assert d["comm_per_step"]["estimate"] is True and d["comm_per_step"]["bytes_per_step"] > 0
    assert d["flops_per_token"] > 0 and len(d["loadavg_before"]) == 3 and len(d["loadavg_after"]) == 3
    assert d["order"] == ["megacpt-r1", "hf-deepspeed-r1", "hf-trainer-r1"]
    assert set(d["results"]) == {"megacpt", "hf-deepspeed", "hf-trainer"}
    for name, res in d["results"].items():
        assert res["tokens_per_s"] > 0
        assert res["tokens_per_s_per_device"] == pytest.approx(res["tokens_per_s"] / 2)
        assert res["tflops_per_device"] == pytest.approx(d["flops_per_token"] * res["tokens_per_s_per_device"] / 1e12)
        assert res["mfu"] is None  # no known peak on CPU
        st = res["step_time"]
        assert st["n"] == 2 and st["p10_s"] <= st["median_s"] <= st["p90_s"]
        assert len(res["peak_memory_mb_per_rank"]) == 2 and all(m and m > 0 for m in res["peak_memory_mb_per_rank"])
        assert "cpu_s_per_step" in res and "tokens_per_cpu_s" in res
    for peer in ("hf-deepspeed", "hf-trainer"):
        ratio = d["ratios"][peer]
        assert ratio["median"] == pytest.approx(d["results"]["megacpt"]["tokens_per_s"] / d["results"][peer]["tokens_per_s"])
    for run in d["runs"]:
        assert "cpu_s_per_step" in run and "tokens_per_cpu_s" in run  # None when the run is this short
        assert len(run["step_times_s"]) == 3 and run["timed_step_times_s"] == run["step_times_s"][1:]
        assert run["command"][1:3] == ["--num_gpus", "2"]
    # The peers trained on the same model and data: the first losses agree closely (random init,
    # HF drops the last position's label, so not exactly).
    first = {run["system"]: run["losses"][0] for run in d["runs"]}
    assert first["hf-deepspeed"] == pytest.approx(first["megacpt"], abs=0.05)


@pytest.mark.slow
def test_bench_memory_smoke(tmp_path):
    """fp32 and bf16 in one invocation: 16 bytes per parameter in both (fp32: the masters are the
    parameter partitions, megacpt/train/zero3_masters.py; bf16: 2-byte parameters and gradients
    next to separate 4-byte masters)."""
    out = tmp_path / "memory.json"
    r = _megacpt("bench", "memory", "--model", "tiny", "--world-sizes", "1,2", "--seq-len", "16", "--json", str(out),
                 "--precision", "fp32,bf16", "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    P = d["model"]["params"]
    assert d["precisions"] == ["fp32", "bf16"]
    assert [(row["precision"], row["world_size"]) for row in d["rows"]] == [("fp32", 1), ("fp32", 2), ("bf16", 1),
                                                                          ("bf16", 2)]
    for row in d["rows"]:
        W, b = row["world_size"], 4 if row["precision"] == "fp32" else 2
        assert row["expected_bytes_per_rank"] == pytest.approx(16 * P / W)
        assert len(row["ranks"]) == W
        # Every parameter is partitioned (threshold 0): the ranks' partitions add up to the
        # model (plus at most one element of padding per parameter and rank).
        total = sum(rk["params"] for rk in row["ranks"])
        assert b * P <= total <= b * P + b * W * 21
        for rk in row["ranks"]:
            assert rk["persistent"] == 0
            assert rk["grads"] == rk["params"]
            elements = rk["params"] // b
            assert rk["adam"] >= 8 * elements  # exp_avg + exp_avg_sq (+ step scalars)
            assert rk["model_state"] == rk["params"] + rk["fp32_master"] + rk["grads"] + rk["adam"] + rk["persistent"]
            # fp32: no second copy of the weights; bf16: 4-byte masters beside the 2-byte parameters
            assert (rk["fp32_master"], rk["fp32_master_shared"]) == ((0, True) if b == 4 else (4 * elements, False))
            assert rk["model_state"] <= 16 * elements + 64  # + one 4-byte Adam step per parameter group
        worst = max(rk["model_state"] for rk in row["ranks"])
        assert row["ratio_to_expected_max"] == pytest.approx(worst / row["expected_bytes_per_rank"])
        assert row["bytes_per_param_max"] == pytest.approx(worst * W / P)
        assert row["bytes_per_param_max"] <= 16.5


@pytest.mark.parametrize("text", ["fp16", "fp32,fp32", "", "fp32;bf16"])
def test_bench_memory_bad_precision_is_a_one_line_error(text, tmp_path, capsys):
    from megacpt.cli import main

    out = tmp_path / "memory.json"
    assert main(["bench", "memory", "--precision", text, "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --precision") and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 2), (2, 3)])
@pytest.mark.parametrize("kv,tied,bias", [(4, False, False), (2, True, True), (1, True, False)])
def test_stage_numels_match_the_split_model(tp, pp, kv, tied, bias):
    # What each stage's rank holds, counted from the model the trainer builds: a meta Transformer
    # split by apply_tp (tp rank 0), cut into stages by stage_bounds.
    from types import SimpleNamespace

    import torch

    from megacpt.models.llama import ModelArgs, Transformer
    from megacpt.parallel.pp import stage_bounds
    from megacpt.parallel.tp import apply_tp

    a = ModelArgs(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=kv,
                  head_dim=8, tie_word_embeddings=tied, qkv_bias=bias)
    with torch.device("meta"):
        m = Transformer(a)
    apply_tp(m, SimpleNamespace(tp_size=tp, tp_rank=0, tp_group=None, tp_subgroup=lambda size: None))
    bounds = stage_bounds(a, pp) if pp > 1 else [0, 3]
    emb, norm = m.embed_tokens.weight.numel(), m.norm.weight.numel()
    for s, got in enumerate(stage_numels(a, tp, pp)):
        want = [p.numel() for i in range(bounds[s], bounds[s + 1]) for p in m.layers[i].parameters()]
        want += [emb] if s == 0 else []
        want += ([norm] + ([emb] if pp > 1 or not tied else [])) if s == pp - 1 else []
        assert got == want


def test_loss_choices_match_the_bench():
    from megacpt.bench import loss
    from megacpt.cli import bench as cli_bench

    assert cli_bench.LOSS_DTYPES == sorted(loss._DTYPES)
    assert cli_bench.LOSS_IMPLS == loss._IMPLS


def test_bench_targets_resolve():
    from megacpt.cli import build_parser
    from megacpt.cli.common import load

    parser = build_parser()
    for argv in (["bench", "train", "--model", "tiny"], ["bench", "memory"], ["bench", "loss"], ["bench", "data"]):
        assert callable(load(parser.parse_args(argv).target))


def _gpu_session_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_session", REPO / "bench" / "gpu_session.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name,scopes,kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", (), "gemm"),
    ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_NTT", (), "gemm"),
    ("triton_tem_fused_mm_0", (), "gemm"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", (), "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", (),
     "elementwise"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", (), "elementwise"),
    ("triton_poi_fused_mul_silu_1", (), "elementwise"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>",
     (), "loss"),
    ("_lce_fwd_kernel", (), "loss"),
    # The head's matmul is a GEMM by name and loss by where it was launched, forward and backward.
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", ("aten::mm", "aten::matmul", "PrecomputedLCE"), "loss"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT",
     ("aten::mm", "autograd::engine::evaluate_function: PrecomputedLCEBackward"), "loss"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", (), "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda>",
     ("aten::copy_", "megacpt::optimizer"), "optimizer"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", ("megacpt::optimizer",), "communication"),
    ("Memcpy HtoD (Pageable -> Device)", (), "other"),
    ("some_unknown_kernel", (), "other"),
])
def test_kernel_kinds(name, scopes, kind):
    from megacpt.bench.kernel_kinds import kernel_kind

    assert kernel_kind(name, scopes) == kind


def test_kernel_bins_add_up():
    from megacpt.bench.kernel_kinds import KINDS, bin_kernels

    assert _gpu_session_module().KINDS == KINDS
    out = bin_kernels([("nvjet_a", 1500.0, ()), ("triton_poi_fused_x", 500.0, ()), ("flash_bwd", 2000.0, ())])
    assert out["total_ms"] == pytest.approx(4.0) and out["compiled_ms"] == pytest.approx(0.5)
    assert out["by_kind"]["gemm"]["ms"] == pytest.approx(1.5) and out["by_kind"]["attention"]["share"] == 0.5
    assert set(out["by_kind"]) == set(KINDS) and out["top"][0]["name"] == "flash_bwd"


@pytest.mark.slow
def test_gpu_session_dry_run(tmp_path):
    """bench/gpu_session.sh --dry-run: every part's command on the tiny shape on CPU, one session
    JSON that passes the schema check; fp8 refused with its one-line error, as a CPU must."""
    out = tmp_path / "out"
    env = cpu_env(OUT=str(out), PY=sys.executable, MEGACPT_CACHE=str(tmp_path / "cache"), WORK=str(tmp_path / "work"))
    env.pop("MEGACPT_GPU_DRY", None)
    r = subprocess.run(["bash", "bench/gpu_session.sh", "--dry-run"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".log"), files
    doc = json.loads((out / files[0]).read_text())
    gs = _gpu_session_module()
    assert gs.problems(doc) == [] and doc["schema_problems"] == []
    status = {name: rec["status"] for name, rec in doc["parts"].items()}
    assert status == {"setup": "ok", "anatomy": "ok", "train": "ok", "loss": "ok", "fp8": "refused"}, status
    assert "needs a CUDA GPU" in doc["parts"]["fp8"]["message"]
    assert doc["dry_run"] is True and doc["gpu"] is None and "nvidia-smi" in doc["gpu_error"]
    assert doc["versions"]["torch"] and doc["source_digest"] == gs.source_digest()
    train = doc["parts"]["train"]["json"]
    assert train["order"] == ["megacpt-r1", "hf-deepspeed-r1"]
    s = doc["summary"]["train"]
    assert s["flops_per_token"] == train["flops_per_token"] > 0 and s["peak_basis"] == "dense bf16"
    assert s["ratio_vs_peer_a"] == pytest.approx(s["tokens_per_s"] / s["peer_a_tokens_per_s"])
    anatomy = doc["parts"]["anatomy"]["json"]
    setup = anatomy["setup"]
    assert anatomy["profile"]["total_ms"] > 0 and len(anatomy["steps"]) == setup["warmup_steps"] + setup["timed_steps"] + 1
    for row in anatomy["steps"][1:]:
        parts = row["forward_ms"] + row["backward_ms"] + row["optimizer_ms"] + row["host_gap_ms"]
        assert parts == pytest.approx(row["total_ms"]) and min(row["forward_ms"], row["backward_ms"]) > 0
    assert anatomy["profile"]["by_kind"]["gemm"]["ms"] > 0 and anatomy["profile"]["by_kind"]["loss"]["ms"] > 0
    assert {r["impl"] for r in doc["parts"]["loss"]["json"]["results"]} >= {"ours", "eager"}
    # The same document read as a real GPU session fails on what only a GPU run can give.
    real = gs.problems(dict(doc, dry_run=False))
    for fragment in ("gpu.name missing", "gpu.power_limit_w missing", "timing is", "1 round(s)",
                     "fewer than 10 timed steps", "no MFU"):
        assert any(fragment in p for p in real), (fragment, real)


def test_peers_choice():
    from megacpt.bench.plan import systems_for
    from megacpt.cli import build_parser
    from megacpt.errors import UserError

    parse = build_parser().parse_args
    assert parse(["bench", "train", "--model", "tiny", "--peers"]).peers == "a,b"  # a bare --peers: both
    assert parse(["bench", "train", "--model", "tiny", "--peers", "a", "--steps", "3"]).peers == "a"
    assert parse(["bench", "train", "--model", "tiny"]).peers is None
    assert systems_for(None) == ["megacpt"]
    assert systems_for("a,b") == ["megacpt", "hf-deepspeed", "hf-trainer"]
    assert systems_for("a") == ["megacpt", "hf-deepspeed"] and systems_for("b") == ["megacpt", "hf-trainer"]
    with pytest.raises(UserError, match="name peers a and/or b"):
        systems_for("c")

"""Model numerics against Hugging Face transformers (the independent reference)."""

import pytest
import torch

from helpers import tiny_hf_model
from megacpt.labels import IGNORE
from megacpt.models.hf import HFWeights, args_from_hf_config, load_full_state, read_hf_config, save_hf
from megacpt.models.llama import Transformer, positions_from_segments

LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=16)

CASES = {
    "llama-untied": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tied=True),
    "llama3-rope-scaling": dict(arch="llama", rope_parameters={"rope_theta": 500000.0, **LLAMA3_SCALING}),
    "llama-linear-rope": dict(arch="llama", rope_parameters={"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}),
    "mistral-window": dict(arch="mistral", sliding_window=7),
    "qwen2-untied": dict(arch="qwen2"),
    "qwen2-tied": dict(arch="qwen2", tied=True),
}


def ours_from(path) -> Transformer:
    args = args_from_hf_config(read_hf_config(path))
    with torch.device("meta"):
        model = Transformer(args)
    load_full_state(model, path)
    return model.eval()


def hf_logits(path, x, dtype):
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dtype).eval()
    with torch.no_grad():
        return m(x).logits


def assert_matches_hf(path, x):
    ref32 = hf_logits(path, x, torch.float32)
    ref64 = hf_logits(path, x, torch.float64)
    with torch.no_grad():
        ours = ours_from(path)(x)
    own_error = (ref32.double() - ref64).abs().max().item()
    diff = (ours.double() - ref32.double()).abs().max().item()
    assert diff <= 2 * own_error + 1e-7, (diff, own_error)
    return diff, own_error


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    kw = dict(CASES[case])
    path = tiny_hf_model(tmp_path / case, **kw)
    args = args_from_hf_config(read_hf_config(path))
    if case == "mistral-window":
        assert args.layer_windows == [7, 7]
    if case.startswith("qwen2"):
        assert args.qkv_bias
    torch.manual_seed(1)
    x = torch.randint(0, 128, (2, 24))  # longer than the sliding window
    assert_matches_hf(path, x)


def test_per_token_loss_matches_cross_entropy_of_transformers_logits(tmp_path):
    """reduction="none" (by-position validation): the fused head's loss per token equals
    cross-entropy on transformers' logits, 0 at ignored labels, and sums to the summed loss."""
    import torch.nn.functional as F

    path = tiny_hf_model(tmp_path / "m", perturb=True)
    torch.manual_seed(2)
    x = torch.randint(0, 128, (2, 17))
    labels = x[:, 1:].clone()
    labels[1, 9:] = IGNORE
    ref = F.cross_entropy(hf_logits(path, x[:, :-1], torch.float64).transpose(1, 2), labels, reduction="none",
                          ignore_index=IGNORE)
    model = ours_from(path)
    with torch.no_grad():
        got = model(x[:, :-1], labels, reduction="none")
        total = model(x[:, :-1], labels)
    assert got.shape == labels.shape and (got[1, 9:] == 0).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(), total, rtol=1e-6, atol=1e-6)


def test_sliding_window_changes_logits(tmp_path):
    """The window is really applied: the same weights without it give other logits."""
    path = tiny_hf_model(tmp_path / "m", arch="mistral", sliding_window=4)
    model = ours_from(path)
    x = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        windowed = model(x)
        for layer in model.layers:
            layer.window = None
        full = model(x)
    assert torch.equal(windowed[:, :4], full[:, :4])
    assert not torch.allclose(windowed[:, 8:], full[:, 8:])


def test_real_smollm2_matches_transformers(smollm2_dir):
    torch.manual_seed(0)
    x = torch.randint(0, 49152, (1, 128))
    assert_matches_hf(smollm2_dir, x)


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip_exact(tmp_path, tied):
    import transformers

    src = tiny_hf_model(tmp_path / "src", tied=tied)
    model = ours_from(src)
    out = tmp_path / "out"
    save_hf(model.state_dict(), model.args, read_hf_config(src), out, source_dir=src)
    again = ours_from(out)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert ("lm_head.weight" in HFWeights(out).keys()) == (not tied)
    # transformers loads the export and computes the same logits as the source.
    x = torch.randint(0, 128, (1, 10))
    m1 = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    m2 = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(m1(x).logits, m2(x).logits)


def test_long_context_overrides_written_to_export(tmp_path):
    import transformers

    from megacpt.models.hf import apply_overrides

    src = tiny_hf_model(tmp_path / "src")
    model = ours_from(src)
    scaling = {"rope_type": "linear", "factor": 2.0}
    args = apply_overrides(model.args, max_seq_len=256, rope_theta=20000.0, rope_scaling=scaling)
    save_hf(model.state_dict(), args, read_hf_config(src), tmp_path / "out")
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert cfg.max_position_embeddings == 256
    assert cfg.rope_parameters["rope_theta"] == 20000.0
    assert cfg.rope_parameters["rope_type"] == "linear" and cfg.rope_parameters["factor"] == 2.0
    # and the exported model still matches ours numerically with the new RoPE
    x = torch.randint(0, 128, (1, 20))
    assert_matches_hf(tmp_path / "out", x)


def test_pytorch_bin_weights_load_with_weights_only(tmp_path):
    import transformers

    src = tiny_hf_model(tmp_path / "src")
    m = transformers.AutoModelForCausalLM.from_pretrained(src)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(m.state_dict(), bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text((src / "config.json").read_text())
    a, b = ours_from(src).state_dict(), ours_from(bin_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_document_masking_isolates_documents(tmp_path):
    """Changing one document leaves the other document's logits unchanged."""
    path = tiny_hf_model(tmp_path / "m")
    model = ours_from(path)
    torch.manual_seed(0)
    x = torch.randint(0, 128, (1, 20))
    seg = torch.tensor([[0] * 8 + [1] * 12])
    y = x.clone()
    y[0, :8] = torch.randint(0, 128, (8,))  # a different first document
    with torch.no_grad():
        lx, ly = model(x, segment_ids=seg), model(y, segment_ids=seg)
        lnomask = model(y)
    assert torch.allclose(lx[0, 8:], ly[0, 8:], atol=1e-6, rtol=0)
    assert not torch.allclose(lx[0, 8:], lnomask[0, 8:], atol=1e-3)
    # The second document alone, from position 0, gives the same logits: positions restart.
    with torch.no_grad():
        alone = model(x[:, 8:])
    assert torch.allclose(alone[0], lx[0, 8:], atol=1e-5, rtol=0)


def test_positions_from_segments():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_flops_per_token_hand_count():
    """6·N_non-embedding + 12·L·h·s, counted by hand for SmolLM2-135M's shape at s=512."""
    from megacpt.models.llama import ModelArgs

    a = ModelArgs(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                  num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
    attn = 576 * 576 + 2 * 576 * 192 + 576 * 576  # q, k, v (3 kv heads × 64), o
    mlp = 3 * 576 * 1536
    per_layer = attn + mlp + 2 * 576
    non_embedding = 30 * per_layer + 576 + 49152 * 576  # + final norm + output head
    assert a.num_params(embedding=False) == non_embedding
    assert a.num_params() == non_embedding  # tied: the head is the embedding, counted once
    assert a.flops_per_token(512) == 6 * non_embedding + 12 * 30 * 576 * 512


def test_sharded_safetensors_round_trip(tmp_path):
    """Several safetensors files plus an index: written, read back exactly, loaded by transformers."""
    import json

    import transformers

    src = tiny_hf_model(tmp_path / "src")
    model = ours_from(src)
    out = tmp_path / "sharded"
    save_hf(model.state_dict(), model.args, read_hf_config(src), out, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = ours_from(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(src).eval()(x).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(x).logits
    assert torch.equal(ref, got)

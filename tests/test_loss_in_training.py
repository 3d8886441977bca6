"""Training with the fused loss follows the same curve as logits + torch's cross_entropy."""

import pytest
import torch

from helpers import tiny_hf_model
from megacpt.models.hf import args_from_hf_config, load_full_state, read_hf_config
from megacpt.models.llama import Transformer


def _model(path):
    with torch.device("meta"):
        m = Transformer(args_from_hf_config(read_hf_config(path)))
    load_full_state(m, path)
    return m


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False), ("mistral", True)])
def test_fused_loss_training_curve_matches_torch_cross_entropy(tmp_path, arch, tied):
    path = tiny_hf_model(tmp_path / "m", arch=arch, tied=tied)
    fused, ref = _model(path), _model(path)
    opt_f = torch.optim.AdamW(fused.parameters(), lr=1e-3)
    opt_r = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    curves = ([], [])
    for _ in range(5):
        x = torch.randint(0, 128, (4, 17), generator=g)
        labels = x[:, 1:].clone()
        labels[0, :3] = -100  # some ignored positions
        n = (labels != -100).sum()
        lf = fused(x[:, :-1], labels=labels) / n
        logits = ref(x[:, :-1])
        lr_ = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), labels.reshape(-1), ignore_index=-100)
        for opt, loss, curve in ((opt_f, lf, curves[0]), (opt_r, lr_, curves[1])):
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=0, atol=1e-5)
    assert curves[0][0] != curves[0][-1]

"""`model.compile: true` (torch.compile per decoder block) trains like eager mode."""

import pytest
import torch

from helpers import run_ok, tiny_hf_model, tiny_run_config, train_losses, write_config

pytestmark = pytest.mark.slow


def test_compiled_blocks_match_eager(tmp_path):
    model = tiny_hf_model(tmp_path / "model")
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        c = tiny_run_config(tmp_path, model, tmp_path / name, steps=3, zero=1,
                            **{"model.compile": compiled, "model.activation_checkpointing": compiled})
        r = run_ok(1, write_config(tmp_path / f"{name}.yaml", c))
        assert ("torch.compile: 2 decoder blocks" in r.stdout) == compiled
        recs = train_losses(tmp_path / name)
        runs[name] = {k: [recs[s][k] for s in sorted(recs)] for k in ("loss", "grad_norm")}
        assert len(runs[name]["loss"]) == 3
    # Inductor fuses and reorders float ops, so not bit-identical, but the same training.
    torch.testing.assert_close(torch.tensor(runs["compiled"]["loss"]), torch.tensor(runs["eager"]["loss"]),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(runs["compiled"]["grad_norm"]),
                               torch.tensor(runs["eager"]["grad_norm"]), rtol=1e-4, atol=1e-6)


def test_compile_with_zero3_is_refused():
    from megacpt.config import config_from_dict
    from megacpt.errors import ConfigError

    with pytest.raises(ConfigError, match="model.compile needs parallel.zero_stage 0, 1 or 2"):
        config_from_dict({"run_dir": "x", "model": {"init_from": "m", "compile": True},
                          "data": {"train": [{"name": "a", "path": "p"}]}, "parallel": {"zero_stage": 3}})

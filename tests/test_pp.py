"""Pipeline parallelism: stage balancing and topology arithmetic (no processes), then the real
DeepSpeed pipeline engine over gloo against the plain model in one process
(tests/dist_pp_worker.py): PP=2 on 2 ranks, and PP=2×DP=2 and TP=2×PP=2 in one 4-rank launch,
for tiny Llama (untied) and Qwen2 (tied embeddings, q/k/v bias) configs, ZeRO-0 and ZeRO-1.
"""

from __future__ import annotations

import pytest

from harness import Scenario, need_gloo, run_scenarios
from helpers import tiny_hf_model
from megacpt.errors import ConfigError
from megacpt.models.llama import ModelArgs
from megacpt.parallel import RankLayout
from megacpt.parallel.pp import item_bounds, layer_weights, stage_bounds


def _args(**kw):
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=6, num_heads=4, num_kv_heads=2,
                head_dim=8)
    base.update(kw)
    return ModelArgs(**base)


def test_balance_by_layers_and_by_parameters():
    a = _args()
    assert stage_bounds(a, 2, "layers") == [0, 3, 6]
    assert stage_bounds(a, 3, "layers") == [0, 2, 4, 6]
    w = layer_weights(a, "parameters")
    per_layer = (a.num_params() - 2 * 128 * 32 - 32) // 6
    assert w[1:-1] == [per_layer] * 4
    assert w[0] == per_layer + 128 * 32 and w[-1] == per_layer + 128 * 32 + 32  # embedding / norm + head
    # Layers of 9,280 elements, embedding 4,096, norm + head 4,128: two layers per stage
    # (22,656 | 18,560 | 22,688) beats any other split of 6 layers over 3 stages.
    assert stage_bounds(a, 3, "parameters") == [0, 2, 4, 6]
    assert stage_bounds(a, 2, "parameters") == [0, 3, 6]
    heavy = _args(vocab_size=1024)  # embedding and head 4× a layer: the end stages keep one layer
    assert stage_bounds(heavy, 3, "parameters") == [0, 1, 5, 6]
    for pp in range(1, 7):
        bounds = stage_bounds(heavy, pp)
        assert bounds[0] == 0 and bounds[-1] == 6 and all(x < y for x, y in zip(bounds, bounds[1:]))
        stage = [sum(layer_weights(heavy, "parameters")[x:y]) for x, y in zip(bounds, bounds[1:])]
        # no other split has a lighter heaviest stage (exhaustive over all splits)
        assert max(stage) == min(max(sum(layer_weights(heavy, "parameters")[x:y]) for x, y in zip(c, c[1:]))
                                 for c in _all_splits(6, pp))
    with pytest.raises(ConfigError, match="pp_balance must be one of"):
        stage_bounds(a, 2, "flops")
    with pytest.raises(ConfigError, match="cannot split 6 layers into 7"):
        stage_bounds(a, 7)


def _all_splits(n, parts):
    import itertools

    for cuts in itertools.combinations(range(1, n), parts - 1):
        yield [0, *cuts, n]


def test_item_bounds_put_embedding_first_and_head_last():
    assert item_bounds([0, 3, 6]) == [0, 4, 8]  # items: embed, 6 layers, head
    assert item_bounds([0, 1, 5, 6]) == [0, 2, 6, 8]


def test_embed_groups_pair_first_and_last_stage():
    L = RankLayout(8, tp=2, pp=2)
    assert L.embed_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert RankLayout(6, tp=1, pp=3).embed_groups() == [[0, 4], [1, 5]]
    assert RankLayout(4, tp=2, pp=1).embed_groups() == []


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp_models")
    return {
        "llama": str(tiny_hf_model(tmp / "llama", "llama", tied=False, kv_heads=2, layers=3, seed=21)),
        "qwen2": str(tiny_hf_model(tmp / "qwen2", "qwen2", tied=True, kv_heads=2, layers=3, seed=22)),
    }


def _pipeline_scenarios(layouts):
    """(label, model_dir, tp, pp, zero) tuples as dist_pp_worker scenarios, in this order."""
    return [Scenario("dist_pp_worker:pipeline_layout", dict(label=label, model_dir=model_dir, tp=tp, pp=pp, zero=zero),
                     name=label) for label, model_dir, tp, pp, zero in layouts]


@pytest.mark.slow
def test_pp2_matches_single_process(tmp_path, models):
    need_gloo()
    scenarios = [("pp2 llama zero1", models["llama"], 1, 2, 1),
                 ("pp2 qwen2 tied zero0 ckpt", models["qwen2"], 1, 2, 0)]
    run_scenarios(2, _pipeline_scenarios(scenarios), tmp_path)


@pytest.mark.slow
def test_world4_pp2_dp2_and_tp2_pp2(tmp_path, models):
    need_gloo()
    scenarios = [("pp2dp2 qwen2 tied zero1", models["qwen2"], 1, 2, 1),
                 ("pp2dp2 llama zero0", models["llama"], 1, 2, 0),
                 ("tp2pp2 llama zero1", models["llama"], 2, 2, 1),
                 ("tp2pp2 qwen2 tied zero0", models["qwen2"], 2, 2, 0)]
    run_scenarios(4, _pipeline_scenarios(scenarios), tmp_path)


def test_resume_relayout_decision():
    """Which resumes re-slice the checkpoint (tp/pp change, or a world-size change of a split
    model) and which keep DeepSpeed's own loading (same layout, or a dp-only change)."""
    from types import SimpleNamespace as N

    from megacpt.train.resume import layout_changed as _layout_changed

    def cfg(tp, pp, bal="parameters"):
        return N(parallel=N(tp=tp, pp=pp, pp_balance=bal))

    def st(tp, pp, world, bal="parameters"):
        return {"config": {"parallel": {"tp": tp, "pp": pp, "pp_balance": bal}}, "world_size": world}

    assert not _layout_changed(st(1, 1, 2), cfg(1, 1), 4)  # dp only: universal checkpoint
    assert not _layout_changed(st(2, 2, 4), cfg(2, 2), 4)
    assert not _layout_changed(st(1, 1, 2, "layers"), cfg(1, 1), 2)  # balance of no pipeline
    assert _layout_changed(st(1, 2, 2), cfg(2, 1), 2)
    assert _layout_changed(st(2, 1, 2), cfg(2, 1), 4)
    assert _layout_changed(st(1, 2, 2, "layers"), cfg(1, 2), 2)

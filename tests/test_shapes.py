"""megacpt.parallel.shapes against the real thing: a meta-device Transformer, split by apply_tp."""

import math
from types import SimpleNamespace

import pytest
import torch

from megacpt.errors import ConfigError
from megacpt.models.llama import ModelArgs, Transformer
from megacpt.parallel.shapes import local_numels, local_shapes, param_shapes, tp_shards_for
from megacpt.parallel.tp import apply_tp, tp_shards


def _args(vocab=96, heads=8, kv=2, tied=False, bias=False, layers=2):
    return ModelArgs(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv, head_dim=4, tie_word_embeddings=tied, qkv_bias=bias)


def _split_meta_model(args, tp, rank):
    with torch.device("meta"):
        m = Transformer(args)
    # apply_tp needs process groups only for replicated KV heads' gradient sums; none here.
    return apply_tp(m, SimpleNamespace(tp_size=tp, tp_rank=rank, tp_group=None, tp_subgroup=lambda size: None))


CONFIGS = [
    # (tp, ModelArgs): kv_heads ≥ tp (split) and < tp (replicated), tied and untied, q/k/v bias,
    # vocabularies that split into odd-sized slices.
    (2, _args()),
    (2, _args(kv=8, tied=True, bias=True)),
    (2, _args(vocab=1002, kv=1, bias=True)),
    (4, _args(kv=4)),
    (4, _args(kv=2, tied=True, bias=True)),
    (4, _args(vocab=1004, kv=1, tied=True, layers=3)),
    (4, _args(vocab=100, heads=4, kv=8, bias=True)),
]


@pytest.mark.parametrize("tp,args", CONFIGS)
def test_tp_shards_for_equals_apply_tp(tp, args):
    for rank in range(tp):
        m = _split_meta_model(args, tp, rank)
        expected = tp_shards(m)
        got = tp_shards_for(args, tp, rank)
        assert list(got) == list(expected)
        assert got == expected  # Shard is a dataclass: dim, start, stop, full_shape and counted all compared
        assert local_shapes(args, tp, rank) == {n: tuple(p.shape) for n, p in m.named_parameters()}
        assert list(local_shapes(args, tp, rank)) == [n for n, _ in m.named_parameters()]
        assert local_numels(args, tp, rank) == {n: p.numel() for n, p in m.named_parameters()}


@pytest.mark.parametrize("tied,bias", [(False, False), (True, True)])
def test_param_shapes_equals_the_model(tied, bias):
    args = _args(tied=tied, bias=bias)
    with torch.device("meta"):
        m = Transformer(args)
    assert list(param_shapes(args).items()) == [(n, tuple(p.shape)) for n, p in m.named_parameters()]


def test_replicated_kv_heads_counted_once_per_replica_group():
    args = _args(kv=2, bias=True)
    counted = [tp_shards_for(args, 4, r)["layers.0.self_attn.k_proj.bias"].counted for r in range(4)]
    starts = [tp_shards_for(args, 4, r)["layers.0.self_attn.v_proj.weight"].start for r in range(4)]
    assert counted == [True, False, True, False]
    assert starts == [0, 0, 4, 4]  # ranks 0-1 share KV head 0, ranks 2-3 head 1 (head_dim 4)


def test_tp1_splits_nothing():
    args = _args()
    assert tp_shards_for(args, 1, 0) == tp_shards(_split_meta_model(args, 1, 0)) == {}
    assert local_shapes(args, 1, 0) == param_shapes(args)


@pytest.mark.parametrize("args", [_args(vocab=1003), _args(kv=3, heads=6)])
def test_unsplittable_models_are_refused_like_apply_tp(args):
    with pytest.raises(ConfigError) as ours:
        tp_shards_for(args, 2, 0)
    with pytest.raises(ConfigError) as theirs:
        _split_meta_model(args, 2, 0)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError):
        tp_shards_for(_args(), 2, 2)


# The families' switches that add parameters (issue 19): q/k norms per head or full width, norms
# after attention / the MLP (OLMo 2) or on both sides (Gemma), 1 + w norms.
FAMILY_SWITCHES = {
    "qwen3": dict(qk_norm="head"),
    "gemma": dict(qk_norm="head", norm_placement="sandwich", norm_form="one_plus_weight", embed_scale=5.0,
                  final_logit_softcap=3.0),
    "olmo2": dict(qk_norm="full", norm_placement="post", norm_form="weight_fp32"),
}


def _family(name, **kw):
    from dataclasses import replace

    return replace(_args(**kw), **FAMILY_SWITCHES[name])


@pytest.mark.parametrize("name", list(FAMILY_SWITCHES))
def test_param_shapes_of_the_families_equal_the_model(name):
    for tied in (False, True):
        args = _family(name, tied=tied)
        with torch.device("meta"):
            m = Transformer(args)
        assert list(param_shapes(args).items()) == [(n, tuple(p.shape)) for n, p in m.named_parameters()]
        assert sum(math.prod(s) for s in param_shapes(args).values()) == args.num_params()


@pytest.mark.parametrize("name,tp,kv", [("qwen3", 2, 2), ("qwen3", 4, 2), ("gemma", 2, 1), ("gemma", 4, 8)])
def test_tp_shards_for_the_families_equal_apply_tp(name, tp, kv):
    test_tp_shards_for_equals_apply_tp(tp, _family(name, kv=kv))


def test_full_width_qk_norm_is_refused_like_apply_tp():
    args = _family("olmo2")
    assert list(local_shapes(args, 1, 0)) == list(param_shapes(args))
    with pytest.raises(ConfigError) as ours:
        tp_shards_for(args, 2, 0)
    with pytest.raises(ConfigError) as theirs:
        _split_meta_model(args, 2, 0)
    assert str(ours.value) == str(theirs.value)
    assert "full-width q/k norm" in str(ours.value) and "spans all heads" in str(ours.value)

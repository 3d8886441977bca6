"""Pipeline parallelism: the plain Transformer cut into stages for DeepSpeed's pipeline engine.

The plain model is built on the meta device (nothing allocated), tensor parallelism is applied
to it as usual, and then it is cut into a flat list of pipeline items:

    [EmbedStage, DecoderStage(0), ..., DecoderStage(L-1), HeadStage]

Stage s runs a contiguous run of decoder layers; the embedding goes with the first stage and
the final norm + head with the last (`stage_bounds`, balanced by parameters — embedding and head
counted — or by layers). Only this rank's items are materialised and loaded from the weights;
the others stay meta and are never registered with the PipelineModule.

Between stages travels the tuple (hidden, position_ids, segment_ids); the head stage returns the
normed hidden state and the engine's loss_fn runs the (vocab-parallel) fused loss on it, so full
logits are never built. Parameter names inside each item are the plain model's names
(`embed_tokens.weight`, `layers.3.mlp.up_proj.weight`, `norm.weight`, `lm_head.weight`), so
DeepSpeed's per-layer checkpoint files (`layer_XX-model_states.pt`) hold HF-convertible keys.

Tied embeddings: embedding and head live on different stages, so the head gets its own copy of
the weight (loaded from `embed_tokens.weight`); after backward the two gradients are summed
over the (first, last) stage group (`Topology.embed_group`) by the engine's ReduceTiedGrads
step, so both copies take identical optimizer steps. In gradient norms the last stage's copy is
not counted (`ds_pipe_replicated`), and every other parameter is counted exactly once across
tp × pp (the `model_parallel` flag DeepSpeed's clipping reads, see `mark_norm_counting`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megacpt.errors import ConfigError
from megacpt.models.hf import WeightSource, as_weights
from megacpt.models.llama import ModelArgs, attention_mask, positions_from_segments, rope_cos_sin, scale_embeddings
from megacpt.parallel.tp import init_tp_weights, load_tp_weights

__all__ = ["BALANCE_METHODS", "stage_bounds", "item_bounds", "layer_weights", "PipeState", "EmbedStage",
           "DecoderStage", "HeadStage", "cut_stages", "megacpt_name"]

BALANCE_METHODS = ("parameters", "layers")


# ---- balancing (pure arithmetic) ---------------------------------------------------------------

def layer_weights(args: ModelArgs, method: str) -> list[int]:
    """Weight of each decoder layer for balancing; the first carries the embedding and the last
    the final norm and the head (a tied head counts again: the last stage holds a copy)."""
    if method not in BALANCE_METHODS:
        raise ConfigError(f"parallel.pp_balance must be one of {', '.join(BALANCE_METHODS)}, got {method!r}")
    L = args.num_layers
    if method == "layers":
        return [1] * L
    h, v = args.hidden_size, args.vocab_size
    per_layer = (args.num_params(embedding=False) - h - v * h) // L  # body without the final norm, per layer
    w = [per_layer] * L
    w[0] += v * h
    w[-1] += h + v * h
    return w


def _split_min_max(weights: list[int], parts: int) -> list[int]:
    """Contiguous split of `weights` into `parts` non-empty runs minimising the heaviest run.
    Returns boundaries [0, b1, ..., len]. Ties go to the earliest boundary (deterministic, so
    every rank computes the same split)."""
    n = len(weights)
    if not 1 <= parts <= n:
        raise ConfigError(f"cannot split {n} layers into {parts} pipeline stages")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    INF = float("inf")
    # best[k][i]: the lightest possible heaviest run when the first i items form k runs.
    best = [[INF] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds = [n]
    i = n
    for k in range(parts, 0, -1):
        i = cut[k][i]
        bounds.append(i)
    return bounds[::-1]


def stage_bounds(args: ModelArgs, pp: int, method: str = "parameters") -> list[int]:
    """Decoder-layer boundaries per stage: stage s runs layers [b[s], b[s+1]); every stage has
    at least one layer (validate_layout already requires pp ≤ num_layers)."""
    return _split_min_max(layer_weights(args, method), pp)


def item_bounds(layer_bounds: list[int]) -> list[int]:
    """The same boundaries over the pipeline items [embed, layer 0..L-1, head]."""
    out = [b + 1 for b in layer_bounds]
    out[0], out[-1] = 0, layer_bounds[-1] + 2
    return out


# ---- stage modules ------------------------------------------------------------------------------

class PipeState:
    """Per-process switches shared by the stage modules and the loss (set by the trainer before
    each train/eval batch): document masking on or off, and the factor the summed token loss is
    multiplied by (turns DeepSpeed's averaging into the token mean of the global batch)."""

    def __init__(self, activation_checkpointing: bool = False):
        self.use_segments = False
        self.loss_scale = 1.0
        self.activation_checkpointing = activation_checkpointing


class EmbedStage(nn.Module):
    """(input_ids, segment_ids) → (hidden, position_ids, segment_ids)."""

    def __init__(self, embed_tokens: nn.Module, pipe_state: PipeState, embed_scale: float | None = None):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.pipe_state = pipe_state
        self.embed_scale = embed_scale  # Gemma's √hidden, as Transformer.forward applies it

    def forward(self, inputs):
        ids, seg = inputs
        b, s = ids.shape
        if self.pipe_state.use_segments:
            pos = positions_from_segments(seg)
        else:
            pos = torch.arange(s, device=ids.device).expand(b, s)
        return scale_embeddings(self.embed_tokens(ids), self.embed_scale), pos.contiguous(), seg


class DecoderStage(nn.Module):
    """One decoder layer; rope and the mask are recomputed from the positions/segments received
    (cheap, and it keeps the tensors sent between stages small)."""

    def __init__(self, index: int, layer: nn.Module, args: ModelArgs, pipe_state: PipeState):
        super().__init__()
        self.layers = nn.ModuleDict({str(index): layer})  # keeps the plain model's parameter names
        self.index, self.args, self.pipe_state = index, args, pipe_state

    def forward(self, inputs):
        x, pos, seg = inputs
        layer = self.layers[str(self.index)]
        cos, sin = rope_cos_sin(self.args, pos, x.dtype, layer.local_rope)  # Gemma 3: sliding layers' own base
        mask = attention_mask(x.shape[1], layer.window, seg if self.pipe_state.use_segments else None, x.device)
        if self.pipe_state.activation_checkpointing and self.training:
            x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
        else:
            x = layer(x, cos, sin, mask)
        return x, pos, seg


class HeadStage(nn.Module):
    """Final norm; the head itself runs in the loss (fused linear cross-entropy, no logits)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, inputs):
        return self.norm(inputs[0])


class StageLoss:
    """loss_fn for the engine: summed token loss × PipeState.loss_scale (a plain object, not a
    module, so the PipelineModule does not register the head twice)."""

    def __init__(self, head: HeadStage, pipe_state: PipeState):
        self.head, self.pipe_state = head, pipe_state
        self.__name__ = "fused_linear_cross_entropy"

    def __call__(self, hidden, labels):
        return self.head.lm_head(hidden, labels) * self.pipe_state.loss_scale


def megacpt_name(pipe_name: str) -> str:
    """A PipelineModule parameter name ('5.layers.4.mlp.up_proj.weight') → the plain model's."""
    return pipe_name.split(".", 1)[1]


def _renamed(inner, alias: dict):
    class Renamed(_Renamed, WeightSource):
        pass

    return Renamed(inner, alias)


class _Renamed:
    """A WeightSource view that reads some names from others (a tied head from the embedding)."""

    def __init__(self, inner, alias: dict):
        self.inner, self.alias = inner, alias
        self.dir = getattr(inner, "dir", "checkpoint")

    def _n(self, name):
        return self.alias.get(name, name)

    def keys(self):
        return list(self.inner.keys()) + [a for a, b in self.alias.items() if b in self.inner]

    def __contains__(self, name):
        return self._n(name) in self.inner

    def shape(self, name):
        return self.inner.shape(self._n(name))

    def get(self, name, rows=None):
        return self.inner.get(self._n(name), rows)

    def get_flat_range(self, name, start, length):
        return self.inner.get_flat_range(self._n(name), start, length)


class _LocalView(nn.Module):
    """This stage's modules under the plain model's attribute names (for loading by name)."""


def cut_stages(model: nn.Module, args: ModelArgs, topology, layer_bounds: list[int], *, weights=None, seed: int = 0,
               dtype=torch.float32, activation_checkpointing: bool = False):
    """The pipeline items for this rank, cut from a meta model that tensor parallelism has already
    been applied to (megacpt.train.parallelize); only this rank's stage is materialised and loaded.

    Returns (items, pipe_state, loss_fn, tied): `items` is the full list (other stages' items
    stay meta), `tied` the local copy's owner module and attribute of a tied embedding (or None).
    `weights`: an HF dir or WeightSource; None draws the layout-independent random init (used
    when a checkpoint is loaded over it).
    """
    tied = args.tie_word_embeddings
    if tied:
        # Two stages, two copies: the head's copy becomes its own (meta) parameter.
        old = model.lm_head.weight
        new = nn.Parameter(torch.empty_like(old, device="meta"), requires_grad=old.requires_grad)
        if hasattr(old, "tensor_model_parallel"):
            new.tensor_model_parallel = old.tensor_model_parallel
        model.lm_head.weight = new
    state = PipeState(activation_checkpointing)
    head = HeadStage(model.norm, model.lm_head)
    items = [EmbedStage(model.embed_tokens, state, args.embed_scale)]
    items += [DecoderStage(i, layer, args, state) for i, layer in enumerate(model.layers)]
    items.append(head)

    ib = item_bounds(layer_bounds)
    stage = topology.pp_rank
    lo, hi = ib[stage], ib[stage + 1]
    view = _LocalView()
    layers = nn.ModuleDict()
    for i in range(lo, hi):
        it = items[i]
        if isinstance(it, EmbedStage):
            view.embed_tokens = it.embed_tokens
        elif isinstance(it, DecoderStage):
            layers[str(it.index)] = it.layers[str(it.index)]
        else:
            view.norm, view.lm_head = it.norm, it.lm_head
    view.layers = layers
    if weights is not None:
        src = as_weights(weights)
        if tied:
            src = _renamed(src, {"lm_head.weight": "embed_tokens.weight"})
        load_tp_weights(view, src, device="cpu", dtype=dtype)
    else:
        init_tp_weights(view, seed, device="cpu", dtype=dtype)
    for p in view.parameters():
        if p.is_meta:
            raise RuntimeError("a parameter of this pipeline stage was left unloaded")
    local_tied = None
    if tied and topology.pp_size > 1:
        if stage == 0:
            local_tied = (items[0].embed_tokens, "weight")
        elif stage == topology.pp_size - 1:
            local_tied = (head.lm_head, "weight")
    return items, state, StageLoss(head, state), local_tied


def mark_norm_counting(module: nn.Module, topology, tied_copy) -> None:
    """Flag which local parameters count in the global gradient norm, so that summing over the
    tp × pp group counts each parameter of the model exactly once: a tp-split slice on every tp
    rank (replicated KV heads on the first of their replicas only), a replicated tensor on tp
    rank 0 only, and the last stage's copy of a tied embedding nowhere (its twin on the first
    stage counts). DeepSpeed's clipping reads `model_parallel`/`tensor_model_parallel` and, under
    ZeRO-1, skips `ds_pipe_replicated`; `megacpt_counted` is ours (ZeRO-0 clipping)."""
    copy_param = getattr(*tied_copy) if tied_copy is not None and topology.pp_rank > 0 else None
    for p in module.parameters():
        if p is copy_param:
            counted = False
            p.ds_pipe_replicated = True
            p.tensor_model_parallel = False
        elif hasattr(p, "tensor_model_parallel"):
            counted = bool(p.tensor_model_parallel)
        else:
            counted = topology.tp_rank == 0
        p.model_parallel = counted
        p.megacpt_counted = counted

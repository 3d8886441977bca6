"""One plain, single-device decoder covering Llama 2/3, Mistral, Qwen2 and SmolLM2.

RMSNorm → attention (RoPE, grouped-query, optional q/k/v bias, optional sliding window) →
RMSNorm → SwiGLU MLP, repeated; tied or untied output head. Parameter names follow Hugging Face
(minus the `model.` prefix) so the HF conversion is a rename, not a reshuffle.

Head counts are never stored on the modules: shapes are inferred with `view(b, s, -1, head_dim)`,
so tensor parallelism can shard the projections after construction without touching this file.
Shapes in comments: b batch, s sequence, h hidden, nh/nkv query/key-value heads, d head dim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megacpt.kernels import linear_cross_entropy
from megacpt.labels import IGNORE


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF rope_parameters beyond theta: {"rope_type": "linear"|"llama3", "factor": ..., ...} or None.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    # Per layer: None for full causal attention, else the window (keys with q - k < window).
    layer_windows: list = field(default_factory=list)

    def __post_init__(self):
        if not self.layer_windows:
            self.layer_windows = [None] * self.num_layers
        if len(self.layer_windows) != self.num_layers:
            raise ValueError("layer_windows must have one entry per layer")

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self, embedding: bool = True) -> int:
        """Parameter count; `embedding=False` excludes the input embedding (the head counts, tied or not)."""
        h, i, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = h * d * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * d * h
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * h * i + 2 * h
        body = self.num_layers * per_layer + h  # final norm
        head = v * h
        emb = v * h
        if embedding:
            return body + emb + (0 if self.tie_word_embeddings else head)
        return body + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 × non-embedding params + attention (12 · L · h · s)."""
        return 6.0 * self.num_params(embedding=False) + 12.0 * self.num_layers * self.hidden_size * seq_len


def rms_norm(x, weight, eps: float):
    # Normalise in fp32 and cast back before the weight, as HF does, so bf16 matches it.
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rope_qk(q, k, cos, sin):
    # One function for q and k, so a compiled copy is one graph with static shapes.
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def swiglu(gate, up):
    return F.silu(gate) * up


def sdpa_attention(q, k, v, mask):
    """Causal attention of (b, h, s, d) q and (b, kv, s, d) k/v; mask: None or bool, True = attend."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=q.shape[1] != k.shape[1]
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.norm_fn = rms_norm  # compile_pointwise swaps in a compiled copy

    def forward(self, x):
        return self.norm_fn(x, self.weight, self.eps)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


def rope_inv_freq(args: ModelArgs, device=None) -> torch.Tensor:
    """Inverse frequencies (d/2,), with HF's 'linear' and 'llama3' scalings."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear, llama3)")


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_cos_sin(args: ModelArgs, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape (b, s, d), computed in fp32 then cast."""
    inv_freq = rope_inv_freq(args, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (b, s, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x: (b, nh, s, d); cos/sin: (b, s, d)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def attention_mask(seq_len: int, window: int | None, segment_ids: torch.Tensor | None, device):
    """Boolean mask (True = attend) or None when plain causal attention suffices.

    segment_ids (b, s): document id per position; attention never crosses documents.
    """
    if window is None and segment_ids is None:
        return None
    q = torch.arange(seq_len, device=device)[:, None]
    k = torch.arange(seq_len, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    mask = mask[None, None]  # (1, 1, s, s)
    if segment_ids is not None:
        same_doc = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # (b, 1, s, s)
        mask = mask & same_doc
    return mask


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, d = args.hidden_size, args.head_dim
        self.head_dim = d
        self.q_proj = nn.Linear(h, args.num_heads * d, bias=args.qkv_bias)
        self.k_proj = nn.Linear(h, args.num_kv_heads * d, bias=args.qkv_bias)
        self.v_proj = nn.Linear(h, args.num_kv_heads * d, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * d, h, bias=False)
        self.rope_fn = rope_qk  # compile_pointwise swaps in a compiled copy

    def forward(self, x, cos, sin, mask):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (b, nh, s, d)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (b, nkv, s, d)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        q, k = self.rope_fn(q, k, cos, sin)
        out = sdpa_attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.act_fn = swiglu  # compile_pointwise swaps in a compiled copy

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.window = args.layer_windows[layer_idx]
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LMHead(nn.Module):
    """Output projection; with targets it returns the summed token loss without full logits.

    It is a module (not a bare matmul in Transformer.forward) so ZeRO-3's hooks gather its weight,
    and so tensor parallelism can swap in a vocab-parallel head.
    """

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, h, targets=None):
        if targets is None:
            return F.linear(h, self.weight)
        return linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), self.weight, targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.activation_checkpointing = False
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = LMHead(args.hidden_size, args.vocab_size)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Random init (HF's normal(0, 0.02)); only used for models that do not start from weights."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                m.reset_parameters()
        if not self.args.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)

    def forward(self, input_ids, labels=None, position_ids=None, segment_ids=None):
        """input_ids (b, s) → logits (b, s, V), or with labels (b, s) the summed loss (fp32 scalar).

        segment_ids (b, s) enables document masking: attention stays inside each document and,
        unless position_ids are given, positions restart at each document start.
        """
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = (
                positions_from_segments(segment_ids)
                if segment_ids is not None
                else torch.arange(s, device=input_ids.device).expand(b, s)
            )
        x = self.embed_tokens(input_ids)  # (b, s, h)
        cos, sin = rope_cos_sin(self.args, position_ids, x.dtype)
        masks = {}
        for layer in self.layers:
            if layer.window not in masks:
                masks[layer.window] = attention_mask(s, layer.window, segment_ids, x.device)
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, masks[layer.window], use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks[layer.window])
        x = self.norm(x)
        return self.lm_head(x, labels)


POINTWISE_FNS = ("norm_fn", "rope_fn", "act_fn")


def compile_pointwise(model: nn.Module) -> int:
    """torch.compile the parameter-free pointwise code of every block (RMSNorm, RoPE, SwiGLU).

    For ZeRO-3, which gathers each linear's weight in hooks on its module, so a whole compiled
    block would break its graph around every linear: these functions take tensors only (the
    norm weight is passed in, already gathered), so they compile to fused loops (one pass over
    memory instead of one per op, forward and backward) and the linears stay eager. One compiled
    copy per function, shared by all blocks. Returns the number of modules changed.
    """
    compiled: dict = {}
    changed = 0
    for module in model.modules():
        for attr in POINTWISE_FNS:
            fn = module.__dict__.get(attr)
            if fn is None or hasattr(fn, "_torchdynamo_orig_callable"):  # absent or compiled already
                continue
            if fn not in compiled:
                compiled[fn] = torch.compile(fn)
            setattr(module, attr, compiled[fn])
            changed += 1
    return changed


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 where the segment id changes. segment_ids (b, s) → (b, s)."""
    b, s = segment_ids.shape
    idx = torch.arange(s, device=segment_ids.device).expand(b, s)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    # Index of the most recent document start at or before each position.
    last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - last_start

"""One plain, single-device decoder for Llama 2/3, Mistral, Qwen2/3, SmolLM2, Gemma 2/3, OLMo 2, Phi-3.

Norm → attention (RoPE, grouped-query, optional q/k/v bias, optional sliding window) → norm →
gated MLP, repeated; tied or untied output head. Parameter names follow Hugging Face (minus the
`model.` prefix) so the HF conversion is a rename, not a reshuffle (Phi-3's fused qkv_proj and
gate_up_proj are split on load and fused on export by models/hf.py).

The families differ only by these ModelArgs switches, set by models/hf.py from config.json
("·": Llama's default; the Llama column also covers Mistral, Qwen2 and SmolLM2):

  switch               Llama            Qwen3   Gemma 2            Gemma 3             OLMo 2       Phi-3
  norm_placement       pre              ·       sandwich           sandwich            post         ·
  norm_form            weight           ·       one_plus_weight    one_plus_weight     weight_fp32  ·
  qk_norm              None             head    ·                  head                full         ·
  hidden_act           silu             ·       gelu_pytorch_tanh  gelu_pytorch_tanh   ·            ·
  embed_scale          None             ·       √hidden            √hidden             ·            ·
  attn_scale           None (d^-½)      ·       qpas^-½ (1)        qpas^-½ (1)         ·            ·
  attn_logit_softcap   None             ·       config (50)        · (2)               ·            ·
  final_logit_softcap  None             ·       config (30)        config (None)       ·            ·
  layer_windows        Mistral: all     as      sliding layers     sliding layers      ·            all, when
                       Qwen2: upper     Qwen2   (layer_types)      (layer_types)                    sliding_window
  rope_theta/scaling   config           config  config             full-attn. layers'  config       config
                       (any type)                                  (1M; any type)                   (longrope)
  local_rope_theta,    None             ·       ·                  sliding layers'     ·            ·
  local_rope_scaling                                               (10k, default)
  partial_rotary_f.    1.0              ·       ·                  ·                   ·            config
  qkv_bias             Qwen2; Llama/    ·       ·                  ·                   ·            ·
                       Mistral: config
  (1) query_pre_attn_scalar. (2) transformers' Gemma 3 attention ignores attn_logit_softcapping.
  RoPE scaling types (SUPPORTED_ROPE_TYPES, as transformers' ROPE_INIT_FUNCTIONS): linear, dynamic
  (NTK base rescaled by the batch's length), yarn, llama3, longrope; Phi-3 takes longrope only.

  norm_placement  pre: x + f(norm(x)); post (OLMo 2): x + norm(f(x)); sandwich (Gemma):
                  x + norm2(f(norm1(x))), i.e. norms before and after attention and the MLP.
  norm_form       weight: w · x̂.to(dtype) (Llama); weight_fp32: (w · x̂).to(dtype) (OLMo 2);
                  one_plus_weight: ((1 + w) · x̂).to(dtype) in fp32 (Gemma; w starts at 0).
  qk_norm         head: RMSNorm over head_dim of each q/k head; full: over the whole q/k
                  projection (nh·d and nkv·d), before the heads are split.

Head counts are never stored on the modules: shapes are inferred with `view(b, s, -1, head_dim)`,
so tensor parallelism can shard the projections after construction without touching this file.
Shapes in comments: b batch, s sequence, h hidden, nh/nkv query/key-value heads, d head dim,
r rotary dims (d unless partial rotary).
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

# Per norm placement: the layer's norm modules (HF names) before attention, after attention,
# before the MLP, after the MLP; None where there is none.
NORM_PLACEMENTS = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
}
NORM_FORMS = ("weight", "weight_fp32", "one_plus_weight")
QK_NORMS = (None, "head", "full")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


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
    # RoPE of the full-attention layers (all layers unless local_rope_theta is set).
    rope_theta: float = 10000.0
    # HF rope_parameters beyond theta: {"rope_type": one of SUPPORTED_ROPE_TYPES, "factor": ..., ...} or None.
    # For "dynamic", original_max_position_embeddings holds the length its rescaling starts past
    # (transformers' max_position_embeddings), so a longer model.max_seq_len does not move it.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    # Per layer: None for full causal attention, else the window (keys with q - k < window).
    layer_windows: list = field(default_factory=list)
    # Family switches (see the table above); the defaults are Llama's.
    norm_placement: str = "pre"
    norm_form: str = "weight"
    qk_norm: str | None = None
    hidden_act: str = "silu"
    embed_scale: float | None = None  # embeddings × this, rounded to the embedding dtype as HF does
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_logit_softcap: float | None = None  # scores → c · tanh(scores / c) before the mask
    final_logit_softcap: float | None = None  # logits → c · tanh(logits / c)
    # RoPE of the sliding-window layers when it differs from the global one (Gemma 3); None: same.
    local_rope_theta: float | None = None
    local_rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0  # rotate only the first int(head_dim × this) dims (Phi-3)
    # > 0: a sequence classifier (HF *ForSequenceClassification): `score` maps the last real
    # token's final hidden state to this many logits; the LM head stays (unused, for the weights).
    num_labels: int = 0
    # Training only (0 in eval mode): on the attention probabilities (HF's attention_dropout) and on
    # each block's attention and MLP outputs before the residual add (Phi-3's resid_pdrop).
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0

    def __post_init__(self):
        if not self.layer_windows:
            self.layer_windows = [None] * self.num_layers
        if len(self.layer_windows) != self.num_layers:
            raise ValueError("layer_windows must have one entry per layer")
        for name, value, allowed in (("norm_placement", self.norm_placement, tuple(NORM_PLACEMENTS)),
                                     ("norm_form", self.norm_form, NORM_FORMS), ("qk_norm", self.qk_norm, QK_NORMS),
                                     ("hidden_act", self.hidden_act, ACTIVATIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} gives {self.rotary_dim} rotary "
                             f"dims of head_dim {self.head_dim}; need an even number in (0, head_dim]")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def rope_for(self, local: bool) -> tuple[float, dict | None]:
        """(theta, scaling) of a sliding-window layer (local) or of the others."""
        if local and self.local_rope_theta is not None:
            return self.local_rope_theta, self.local_rope_scaling
        return self.rope_theta, self.rope_scaling

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self, embedding: bool = True) -> int:
        """Parameter count; `embedding=False` excludes the input embedding (the head counts, tied or not).
        Counts every norm: the layer's (2 or 4 by norm_placement, or OLMo 2's 2) and the q/k norms."""
        h, i, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * (q + 2 * kv) + q * h
        if self.qkv_bias:
            attn += q + 2 * kv
        attn += {None: 0, "head": 2 * d, "full": q + kv}[self.qk_norm]
        norms = sum(n is not None for n in NORM_PLACEMENTS[self.norm_placement]) * h
        per_layer = attn + 3 * h * i + norms
        body = self.num_layers * per_layer + h  # final norm
        head = v * h
        emb = v * h
        body += self.num_labels * h
        if embedding:
            return body + emb + (0 if self.tie_word_embeddings else head)
        return body + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 × non-embedding params + attention (12 · L · nh · d · s).
        The attention term counts the width attention computes (nh · d), which differs from the
        hidden size for Gemma and Qwen3."""
        width = self.num_heads * self.head_dim
        return 6.0 * self.num_params(embedding=False) + 12.0 * self.num_layers * width * seq_len


# ---- pointwise functions (tensors in, tensors out: compile_pointwise compiles them) -------------

def rms_norm(x, weight, eps: float):
    # Normalise in fp32 and cast back before the weight, as HF does, so bf16 matches it.
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rms_norm_weight_fp32(x, weight, eps: float):
    # OLMo 2: the weight multiplies the fp32 value, then the cast.
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * x32).to(dtype)


def rms_norm_one_plus(x, weight, eps: float):
    # Gemma: (1 + w) in fp32, then the cast (HF's Gemma RMSNorm; w is stored centred on 0).
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * (1.0 + weight.float())).to(dtype)


NORM_FNS = {"weight": rms_norm, "weight_fp32": rms_norm_weight_fp32, "one_plus_weight": rms_norm_one_plus}


def rope_qk(q, k, cos, sin):
    # One function for q and k, so a compiled copy is one graph with static shapes.
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def swiglu(gate, up):
    return F.silu(gate) * up


def geglu(gate, up):
    # Gemma: GELU with the tanh approximation (HF's gelu_pytorch_tanh).
    return F.gelu(gate, approximate="tanh") * up


ACT_FNS = {"silu": swiglu, "gelu_pytorch_tanh": geglu}


def soft_cap(x, cap: float):
    # In HF's order (divide, tanh, multiply), so the rounding matches.
    return torch.tanh(x / cap) * cap


def scale_embeddings(x, scale: float | None):
    """Gemma: embeddings × √hidden, the factor rounded to the embedding dtype first (HF's
    ScaledWordEmbedding keeps it as an fp32 tensor cast to the weight's dtype). None: unchanged."""
    if scale is None:
        return x
    return x * torch.tensor(scale, dtype=torch.float32, device=x.device).to(x.dtype)


def sdpa_attention(q, k, v, mask, scale: float | None = None, softcap: float | None = None, dropout: float = 0.0):
    """Causal attention of (b, h, s, d) q and (b, kv, s, d) k/v; mask: None or bool, True = attend.
    scale None: d ** -0.5. A soft-cap needs the scores themselves, which SDPA never exposes, so
    capped attention (Gemma 2) takes the explicit path. dropout: on the probabilities."""
    if softcap is not None:
        return softcapped_attention(q, k, v, mask, scale if scale is not None else q.shape[-1] ** -0.5, softcap,
                                    dropout)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        dropout_p=dropout,
    )


def softcapped_attention(q, k, v, mask, scale: float, softcap: float, dropout: float = 0.0):
    """HF's eager Gemma 2 attention: scores × scale, capped, masked, softmax in fp32."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (b, nh, s, d)
    scores = soft_cap(torch.matmul(q, k.transpose(2, 3)) * scale, softcap)  # (b, nh, s, s)
    if mask is None:
        s = q.shape[2]
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        probs = F.dropout(probs, dropout)
    return torch.matmul(probs, v)


# ---- rotary embeddings ----------------------------------------------------------------------------

def rope_kind(scaling: dict | None) -> str:
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def rope_exponents(d: int, device=None) -> torch.Tensor:
    """The exponents 2i/d of the base, i < d/2 (int64 arange cast to fp32, rounding as transformers)."""
    return torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d


def rope_inv_freq(args: ModelArgs, device=None, local: bool = False, long: bool = False) -> torch.Tensor:
    """Inverse frequencies (r/2,) of HF's rope types: for 'longrope' the short factors (the long
    ones with long=True), for 'dynamic' those at or below its original length (rope_cos_sin
    switches both by the batch's length)."""
    theta, scaling = args.rope_for(local)
    d = args.rotary_dim
    exponents = rope_exponents(d, device)
    kind = rope_kind(scaling)
    if kind == "longrope":
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32, device=device)
        return 1.0 / (factors * theta**exponents)
    if kind == "dynamic":
        # transformers' initial frequencies: the formula at the original length, in Python floats.
        original = scaling["original_max_position_embeddings"]
        return 1.0 / (dynamic_base(theta, scaling["factor"], original, original, d) ** exponents)
    if kind == "yarn":
        return yarn_inv_freq(theta, scaling, d, device)
    inv_freq = 1.0 / (theta**exponents)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope_type {kind!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
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


def dynamic_base(theta: float, factor, seq_len, original: int, d: int):
    """NTK-aware base for a sequence of seq_len positions (a Python number, or an int64 tensor whose
    fp32 arithmetic then matches transformers' update in the forward): theta at the original length,
    growing as the sequence does."""
    return theta * ((factor * seq_len / original) - (factor - 1)) ** (d / (d - 2))


def yarn_inv_freq(theta: float, scaling: dict, d: int, device=None) -> torch.Tensor:
    """YaRN: dims that turn more than beta_fast times over the original context keep their
    frequency (extrapolation), those under beta_slow turns are divided by `factor`
    (interpolation), a linear ramp between; `truncate` rounds the ramp's ends to whole dims."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_of(turns):  # the (fractional) dim that turns `turns` times over the original context
        return (d * math.log(original / (turns * 2 * math.pi))) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # as transformers: a step instead of a ramp, without dividing by zero
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    pos_freqs = theta ** rope_exponents(d, device)
    extrapolated = 1 - ramp  # the share of each dim that keeps its frequency
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolated) + (1.0 / pos_freqs) * extrapolated


def yarn_mscale(factor, mscale=1) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_attention_factor(args: ModelArgs, local: bool = False) -> float:
    """The factor cos/sin are multiplied by: 1 except for longrope and yarn, where it is
    attention_factor when given. Else yarn: 0.1 · mscale · ln(factor) + 1, or the ratio of that
    for mscale and mscale_all_dim when both are set (transformers' _compute_yarn_parameters);
    longrope: √(1 + ln(factor) / ln(original max)) with factor = max_position_embeddings /
    original max unless given (_compute_longrope_parameters)."""
    _, scaling = args.rope_for(local)
    kind = rope_kind(scaling)
    if kind not in ("longrope", "yarn"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    if kind == "yarn":
        factor, mscale, mscale_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all:
            return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all))
        return yarn_mscale(factor)
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    if factor is None:
        factor = args.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def length_inv_freq(args: ModelArgs, position_ids: torch.Tensor, inv_freq: torch.Tensor, local: bool):
    """longrope and dynamic: the frequencies for the batch's longest position count. Past the
    original length longrope takes its long factors and dynamic rescales its base for that count
    (transformers' dynamic_rope_update, on a freshly loaded model: transformers keeps a grown
    base cached until a sequence shorter than the original arrives, megacpt recomputes it per
    batch). Tensor operations only: no host sync and no graph break."""
    theta, scaling = args.rope_for(local)
    original = scaling["original_max_position_embeddings"]
    seq_len = position_ids.max() + 1
    if rope_kind(scaling) == "longrope":
        long = rope_inv_freq(args, position_ids.device, local, long=True)
    else:
        base = dynamic_base(theta, scaling["factor"], seq_len.clamp(min=original), original, args.rotary_dim)
        long = 1.0 / (base ** rope_exponents(args.rotary_dim, position_ids.device))
    return torch.where(seq_len > original, long, inv_freq)


def rope_cos_sin(args: ModelArgs, position_ids: torch.Tensor, dtype: torch.dtype, local: bool = False):
    """cos/sin of shape (b, s, r), computed in fp32 then cast; `local`: a sliding-window layer's RoPE."""
    _, scaling = args.rope_for(local)
    inv_freq = rope_inv_freq(args, position_ids.device, local)
    if rope_kind(scaling) in ("longrope", "dynamic"):
        inv_freq = length_inv_freq(args, position_ids, inv_freq, local)
    freqs = position_ids[..., None].float() * inv_freq  # (b, s, r/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    factor = rope_attention_factor(args, local)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.to(dtype), sin.to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x: (b, nh, s, d); cos/sin: (b, s, r). With r < d (partial rotary) the rest passes unrotated.
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


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


# ---- modules --------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, form: str = "weight"):
        super().__init__()
        self.eps = eps
        self.form = form
        self.weight = nn.Parameter(torch.ones(dim) if form != "one_plus_weight" else torch.zeros(dim))
        self.norm_fn = NORM_FNS[form]  # compile_pointwise swaps in a compiled copy

    def forward(self, x):
        return self.norm_fn(x, self.weight, self.eps)

    def reset_parameters(self):
        # The identity norm: w = 1, or w = 0 in the (1 + w) form.
        (nn.init.zeros_ if self.form == "one_plus_weight" else nn.init.ones_)(self.weight)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, d = args.hidden_size, args.head_dim
        self.head_dim = d
        self.scale, self.softcap, self.qk_norm = args.attn_scale, args.attn_logit_softcap, args.qk_norm
        self.q_proj = nn.Linear(h, args.num_heads * d, bias=args.qkv_bias)
        self.k_proj = nn.Linear(h, args.num_kv_heads * d, bias=args.qkv_bias)
        self.v_proj = nn.Linear(h, args.num_kv_heads * d, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * d, h, bias=False)
        if args.qk_norm is not None:
            per_head = args.qk_norm == "head"
            self.q_norm = RMSNorm(d if per_head else args.num_heads * d, args.rms_norm_eps, args.norm_form)
            self.k_norm = RMSNorm(d if per_head else args.num_kv_heads * d, args.rms_norm_eps, args.norm_form)
        self.rope_fn = rope_qk  # compile_pointwise swaps in a compiled copy
        self.dropout = args.attention_dropout

    def forward(self, x, cos, sin, mask, cp=None):
        b, s, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (b, s, nh·d), (b, s, nkv·d) ×2
        if self.qk_norm == "full":  # OLMo 2: over the whole projection
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, s, -1, self.head_dim).transpose(1, 2)  # (b, nh, s, d)
        k = k.view(b, s, -1, self.head_dim).transpose(1, 2)  # (b, nkv, s, d)
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":  # Qwen3, Gemma 3: each head over d
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope_fn(q, k, cos, sin)
        if cp is not None:  # over the whole sequence (dropout is refused with cp)
            out = cp.attention(q, k, v, mask, self.scale, self.softcap)
        else:
            out = sdpa_attention(q, k, v, mask, self.scale, self.softcap, self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.act_fn = ACT_FNS[args.hidden_act]  # compile_pointwise swaps in a compiled copy

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.window = args.layer_windows[layer_idx]
        # Sliding-window layers take the local RoPE where the model has one (Gemma 3).
        self.local_rope = self.window is not None and args.local_rope_theta is not None
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        # Norms are looked up by name at each call, so tensor parallelism may swap them.
        self.norm_names = NORM_PLACEMENTS[args.norm_placement]
        self.residual_dropout = args.residual_dropout
        for name in self.norm_names:
            if name is not None:
                setattr(self, name, RMSNorm(args.hidden_size, args.rms_norm_eps, args.norm_form))

    def _norm(self, i: int, x):
        name = self.norm_names[i]
        return x if name is None else getattr(self, name)(x)

    def forward(self, x, cos, sin, mask, cp=None):
        p = self.residual_dropout if self.training else 0.0
        x = x + F.dropout(self._norm(1, self.self_attn(self._norm(0, x), cos, sin, mask, cp)), p)
        return x + F.dropout(self._norm(3, self.mlp(self._norm(2, x))), p)


class LMHead(nn.Module):
    """Output projection; with targets it returns the summed token loss without full logits.

    It is a module (not a bare matmul in Transformer.forward) so ZeRO-3's hooks gather its weight,
    and so tensor parallelism can swap in a vocab-parallel head. `softcap` (Gemma 2) caps the
    logits, in the fused loss as in the returned logits.
    """

    def __init__(self, hidden_size: int, vocab_size: int, softcap: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.softcap = softcap

    def forward(self, h, targets=None, reduction: str = "sum"):
        if targets is None:
            logits = F.linear(h, self.weight)
            return logits if self.softcap is None else soft_cap(logits, self.softcap)
        return linear_cross_entropy(h, self.weight, targets, ignore_index=IGNORE, reduction=reduction,
                                    softcap=self.softcap)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.activation_checkpointing = False
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.norm_form)
        self.lm_head = LMHead(args.hidden_size, args.vocab_size, args.final_logit_softcap)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.score = nn.Linear(args.hidden_size, args.num_labels, bias=False) if args.num_labels else None
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

    def forward(self, input_ids, labels=None, position_ids=None, segment_ids=None, pool_index=None,
                reduction="sum", cp=None):
        """input_ids (b, s) → logits (b, s, V), or with labels (b, s) the summed loss (fp32 scalar);
        with reduction="none" the loss per token instead ((b, s), 0 at ignored labels).

        segment_ids (b, s) enables document masking: attention stays inside each document and,
        unless position_ids are given, positions restart at each document start.
        A classifier (args.num_labels > 0) pools position pool_index (b,) of each row (its last
        real token; padding follows it, so causal attention never sees it) → logits (b, num_labels),
        or with labels (b,) the summed cross-entropy.
        cp (context parallelism, megacpt/parallel/cp.py): input_ids and labels are this rank's
        block cp.rank of cp.size contiguous blocks of the sequence, position_ids and segment_ids
        (when given) cover the whole sequence (b, s · cp.size), and attention runs through
        cp.attention, which sees the whole sequence.
        """
        b, s = input_ids.shape
        n = s * cp.size if cp is not None else s  # the whole sequence
        if position_ids is None:
            position_ids = (
                positions_from_segments(segment_ids)
                if segment_ids is not None
                else torch.arange(n, device=input_ids.device).expand(b, n)
            )
        x = scale_embeddings(self.embed_tokens(input_ids), self.args.embed_scale)  # (b, s, h)
        masks, ropes = {}, {}
        for layer in self.layers:
            if layer.window not in masks:
                masks[layer.window] = attention_mask(n, layer.window, segment_ids, x.device)
            if layer.local_rope not in ropes:
                # Over the whole sequence, then this rank's block: dynamic and longrope RoPE
                # depend on the longest position of the batch, which must be the same everywhere.
                cos, sin = rope_cos_sin(self.args, position_ids, x.dtype, layer.local_rope)
                ropes[layer.local_rope] = (cos, sin) if cp is None else (cos[:, cp.rank * s:(cp.rank + 1) * s],
                                                                         sin[:, cp.rank * s:(cp.rank + 1) * s])
            cos, sin = ropes[layer.local_rope]
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, masks[layer.window], cp, use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks[layer.window], cp)
        x = self.norm(x)
        if self.score is not None:
            return self.classify(x, pool_index, labels)
        return self.lm_head(x, labels, reduction)

    def classify(self, x, pool_index, labels=None):
        pooled = x[torch.arange(x.shape[0], device=x.device), pool_index]
        logits = self.score(pooled).float()
        if labels is None:
            return logits
        return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


POINTWISE_FNS = ("norm_fn", "rope_fn", "act_fn")


def compile_pointwise(model: nn.Module) -> int:
    """torch.compile the parameter-free pointwise code of every block (RMSNorm, RoPE, SwiGLU/GeGLU).

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

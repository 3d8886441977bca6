"""Hugging Face directory <-> megacpt: config.json, weight files, tied embeddings, dtypes.

Reading is lazy and sliced (safetensors `get_slice`), so a rank can read only the part of a
tensor it keeps. Writing produces safetensors shards plus an index, and a config.json that
`transformers` loads, with the long-context overrides written in.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megacpt import atomic
from megacpt.errors import UserError
from megacpt.models.llama import ACTIVATIONS, SUPPORTED_ROPE_TYPES, ModelArgs, rope_kind
from megacpt.safe_load import refusal_reason

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
    "Gemma3ForCausalLM", "Olmo2ForCausalLM", "Phi3ForCausalLM",
)
GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
# transformers' config-class defaults for keys a config.json may leave out, where a family's
# differ from the generic ones read below.
FAMILY_DEFAULTS = {
    "Qwen3ForCausalLM": {"head_dim": 128},
    "Gemma2ForCausalLM": {"head_dim": 256, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
                          "final_logit_softcapping": 30.0, "sliding_window": 4096, "tie_word_embeddings": True,
                          "hidden_activation": "gelu_pytorch_tanh"},
    "Gemma3ForCausalLM": {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                          "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
                          "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0},
    "Olmo2ForCausalLM": {"rms_norm_eps": 1e-5},
    "Phi3ForCausalLM": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                        "original_max_position_embeddings": 4096},
}
# Phi-3 stores these projections fused: HF tensor → (megacpt parts, in row order).
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
FUSED_ARCHITECTURES = ("Phi3ForCausalLM",)
# The sequence classifier of each family (task: classify exports these); Gemma 3's text-only one.
CLASSIFIERS = {arch: arch.replace("ForCausalLM", "ForSequenceClassification") for arch in SUPPORTED_ARCHITECTURES}
CLASSIFIERS["Gemma3ForCausalLM"] = "Gemma3TextForSequenceClassification"
# Files copied verbatim from the source directory into an export.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def read_hf_config(model_dir) -> dict:
    d = Path(model_dir)
    if not d.exists():
        raise UserError(f"model directory {model_dir} does not exist; set model.init_from to a Hugging Face model dir")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{model_dir} has no config.json; point model.init_from at a Hugging Face model directory")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {cfg_path}: {e}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path} is not a JSON object")
    return cfg


def architecture(cfg: dict, source: str = "config.json") -> str:
    """The config's architecture, or the one-line error naming the supported ones."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    arch = {v: k for k, v in CLASSIFIERS.items()}.get(arch, arch)  # a classifier is its family's decoder
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{source}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def split_rope(rp: dict) -> tuple[float, dict | None]:
    """HF rope parameters {"rope_theta", "rope_type", ...} → (theta, scaling or None for plain RoPE)."""
    theta = float(rp["rope_theta"])
    scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if "type" in scaling:  # the older name; transformers keeps rope_type where a dict has both
        scaling.setdefault("rope_type", scaling.pop("type"))
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    return theta, scaling


def rope_params(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) as transformers reads them: the older `rope_scaling` when set (it wins
    over transformers 5's `rope_parameters`), theta from the dict or the top-level rope_theta."""
    rp = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    return split_rope({"rope_theta": cfg.get("rope_theta", 10000.0), **rp})


def gemma3_rope(cfg: dict) -> tuple[tuple, tuple]:
    """((theta, scaling) of the full-attention layers, (theta, scaling) of the sliding ones), as
    Gemma3TextConfig reads them: `rope_parameters` per layer type, or the older rope_theta /
    rope_local_base_freq / rope_scaling (which applies to the full-attention layers)."""
    rp = cfg.get("rope_parameters") or {}
    full = dict(rp.get("full_attention") or {})
    full.update(cfg.get("rope_scaling") or {})
    full.setdefault("rope_theta", cfg["rope_theta"])
    local = dict(rp.get("sliding_attention") or {})
    local.setdefault("rope_theta", cfg["rope_local_base_freq"])
    return split_rope(full), split_rope(local)


def family_rope(cfg: dict, arch: str) -> dict:
    """The RoPE fields of ModelArgs: global and local (Gemma 3) theta and scaling, partial rotary (Phi-3)."""
    local_theta = local_scaling = None
    if arch == "Gemma3ForCausalLM":
        (theta, scaling), (local_theta, local_scaling) = gemma3_rope(cfg)
    else:
        theta, scaling = rope_params(cfg)
    partial = 1.0
    if arch == "Phi3ForCausalLM":
        rp = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        partial = float(rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
        if scaling and scaling.get("rope_type") in ("su", "yarn"):  # Phi3Config's old names for longrope
            scaling["rope_type"] = "longrope"
    nested = arch == "Gemma3ForCausalLM"  # transformers' per-layer-type rope_parameters
    return dict(rope_theta=theta, rope_scaling=fill_original(scaling, cfg, nested), local_rope_theta=local_theta,
                local_rope_scaling=fill_original(local_scaling, cfg, nested), partial_rotary_factor=partial)


def fill_original(scaling: dict | None, cfg: dict, nested: bool) -> dict | None:
    """original_max_position_embeddings of a scaling dict as transformers resolves it. llama3,
    yarn, longrope: a top-level key wins (Phi3Config always has one; not for per-layer-type
    dicts), else the dict's, else max_position_embeddings. dynamic: always max_position_embeddings
    (transformers ignores the key there), which megacpt keeps in the dict (see ModelArgs)."""
    kind = rope_kind(scaling)
    max_pos = cfg.get("max_position_embeddings", 2048)
    if kind in ("llama3", "yarn", "longrope"):
        top = None if nested else cfg.get("original_max_position_embeddings")
        value = top if top is not None else scaling.get("original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = int(value if value is not None else max_pos)
    elif kind == "dynamic":
        scaling["original_max_position_embeddings"] = int(max_pos)
    return scaling


def family_switches(cfg: dict, arch: str, source: str) -> dict:
    """The family switches of ModelArgs (table in models/llama.py)."""
    gemma = arch in GEMMA
    if arch not in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM") and cfg.get("attention_bias"):
        raise UserError(f"{source}: attention_bias is not supported for {arch} (its o_proj would have a bias too)")
    if cfg.get("use_bidirectional_attention"):
        raise UserError(f"{source}: use_bidirectional_attention is not supported (megacpt trains causal LMs)")
    # Gemma's config classes read hidden_activation (hidden_act is an older, ignored key).
    key = "hidden_activation" if gemma else "hidden_act"
    act = cfg.get(key) or ("gelu_pytorch_tanh" if gemma else "silu")
    if act not in ACTIVATIONS:
        raise UserError(f"{source}: unsupported {key} {act!r} (supported: {', '.join(ACTIVATIONS)})")
    out = dict(hidden_act=act, qk_norm={"Qwen3ForCausalLM": "head", "Gemma3ForCausalLM": "head",
                                        "Olmo2ForCausalLM": "full"}.get(arch))
    if arch == "Olmo2ForCausalLM":
        out.update(norm_placement="post", norm_form="weight_fp32")
    if gemma:
        cap = cfg.get("final_logit_softcapping")
        out.update(norm_placement="sandwich", norm_form="one_plus_weight",
                   embed_scale=float(cfg["hidden_size"]) ** 0.5,
                   attn_scale=float(cfg["query_pre_attn_scalar"]) ** -0.5,
                   final_logit_softcap=float(cap) if cap is not None else None)
    if arch == "Gemma2ForCausalLM" and cfg.get("attn_logit_softcapping") is not None:
        # Gemma 3's attention ignores attn_logit_softcapping in transformers, so only Gemma 2 caps.
        out["attn_logit_softcap"] = float(cfg["attn_logit_softcapping"])
    return out


# Per rope_type: the scaling dict's required keys and its optional ones (rope_type aside), as
# transformers' validation has them (dynamic's original_max_position_embeddings is megacpt's, see ModelArgs).
ROPE_KEYS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "longrope": (("short_factor", "long_factor", "original_max_position_embeddings"), ("factor", "attention_factor")),
}
NUMBER_KEYS = ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
               "low_freq_factor", "high_freq_factor")
# Families whose transformers config class takes only some rope types (Phi3Config refuses the others).
FAMILY_ROPE_TYPES = {"Phi3ForCausalLM": ("default", "longrope")}


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_rope_scaling(scaling: dict | None, rotary_dim: int, where: str, per_layer_type: bool = False) -> None:
    """A UserError naming what is wrong with a RoPE scaling dict (None is plain RoPE).
    per_layer_type: the model keeps transformers' per-layer-type rope_parameters (Gemma 3)."""
    if not scaling:
        return
    kind = scaling.get("rope_type")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UserError(f"{where}: unsupported rope_type {kind!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    missing = [k for k in ROPE_KEYS[kind][0] if scaling.get(k) is None]
    if missing:
        raise UserError(f"{where}: rope_type {kind!r} needs {', '.join(missing)}")
    for key in NUMBER_KEYS:
        if scaling.get(key) is not None and not is_number(scaling[key]):
            raise UserError(f"{where}: {key} must be a number, got {scaling[key]!r}")
    factor = scaling.get("factor")
    # longrope's factor only sets its attention factor (1 at or below 1), and one pinned from a
    # config whose max_position_embeddings is below the original may be under 1.
    if factor is not None and kind == "longrope" and factor <= 0:
        raise UserError(f"{where}: factor must be > 0, got {factor}")
    if factor is not None and kind != "longrope" and factor < 1:
        raise UserError(f"{where}: factor must be >= 1 (the context grows by it), got {factor}")
    if scaling.get("attention_factor") is not None and scaling["attention_factor"] <= 0:
        raise UserError(f"{where}: attention_factor must be > 0, got {scaling['attention_factor']}")
    original = scaling.get("original_max_position_embeddings")
    if original is not None and not (isinstance(original, int) and not isinstance(original, bool) and original > 0):
        raise UserError(f"{where}: original_max_position_embeddings must be a positive integer, got {original!r}")
    check_rope_kind(scaling, kind, rotary_dim, where, per_layer_type)


def check_rope_kind(scaling: dict, kind: str, rotary_dim: int, where: str, per_layer_type: bool) -> None:
    """The checks of one rope type's own parameters (check_rope_scaling did the common ones)."""
    if kind == "yarn":
        fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1  # transformers' defaults
        if fast <= slow:
            raise UserError(f"{where}: yarn needs beta_fast > beta_slow (defaults 32 and 1), got {fast} and {slow}")
        if scaling.get("truncate") is not None and not isinstance(scaling["truncate"], bool):
            raise UserError(f"{where}: truncate must be true or false, got {scaling['truncate']!r}")
        if per_layer_type and scaling.get("truncate") is False:
            raise UserError(f"{where}: transformers ignores yarn's truncate in per-layer-type RoPE (Gemma 3), "
                            f"so the model would differ there; remove truncate")
    if kind == "llama3" and not 0 < scaling["low_freq_factor"] < scaling["high_freq_factor"]:
        raise UserError(f"{where}: llama3 needs 0 < low_freq_factor < high_freq_factor, got "
                        f"{scaling['low_freq_factor']} and {scaling['high_freq_factor']}")
    if kind == "dynamic" and rotary_dim <= 2:
        raise UserError(f"{where}: rope_type 'dynamic' needs more than 2 rotary dims, got {rotary_dim}")
    for key in ("short_factor", "long_factor") if kind == "longrope" else ():
        if not isinstance(scaling[key], list) or len(scaling[key]) != rotary_dim // 2:
            raise UserError(f"{where}: {key} must be a list of {rotary_dim // 2} numbers (rotary dims / 2)")


def check_family_rope(arch: str, scaling: dict | None, where: str) -> None:
    """A rope type the family's transformers config class refuses (Phi-3: longrope only)."""
    allowed = FAMILY_ROPE_TYPES.get(arch)
    if allowed and rope_kind(scaling) not in allowed:
        raise UserError(f"{where}: {arch} takes rope_type {' or '.join(allowed)} in transformers, "
                        f"not {rope_kind(scaling)!r}")


def args_from_hf_config(cfg: dict, source: str = "config.json") -> ModelArgs:
    arch = architecture(cfg, source)
    cfg = {**FAMILY_DEFAULTS.get(arch, {}), **cfg}
    try:
        h, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        nl = int(cfg["num_hidden_layers"])
        args = ModelArgs(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=h,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=nl,
            num_heads=nh,
            num_kv_heads=int(cfg.get("num_key_value_heads") or nh),
            head_dim=int(cfg.get("head_dim") or h // nh),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama/Mistral only with attention_bias.
            qkv_bias=arch == "Qwen2ForCausalLM" or (arch in ("LlamaForCausalLM", "MistralForCausalLM")
                                                    and bool(cfg.get("attention_bias", False))),
            layer_windows=layer_windows(cfg, arch, nl, source),
            num_labels=num_labels(cfg),
            attention_dropout=float(cfg.get("attention_dropout") or 0.0),
            residual_dropout=float(cfg.get("resid_pdrop") or 0.0) if arch == "Phi3ForCausalLM" else 0.0,
            **family_rope(cfg, arch),
            **family_switches(cfg, arch, source),
        )
    except KeyError as e:
        raise UserError(f"{source}: missing key {e.args[0]!r}") from None
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None
    per_layer_type = args.local_rope_theta is not None
    check_rope_scaling(args.rope_scaling, args.rotary_dim, source, per_layer_type)
    check_rope_scaling(args.local_rope_scaling, args.rotary_dim, source, per_layer_type)
    check_family_rope(arch, args.rope_scaling, source)
    return args


def num_labels(cfg: dict) -> int:
    """A sequence classifier's label count (0 for a causal LM, whose configs carry num_labels too)."""
    arch = (cfg.get("architectures") or [""])[0]
    if not arch.endswith("ForSequenceClassification"):
        return 0
    return len(cfg["id2label"]) if cfg.get("id2label") else int(cfg.get("num_labels", 2))


def classifier_config(base_cfg: dict, labels: list[str], pad_token_id: int) -> dict:
    """The HF config of a classifier on `base_cfg`'s decoder: what *ForSequenceClassification reads."""
    cfg = dict(base_cfg)
    cfg["architectures"] = [CLASSIFIERS[architecture(base_cfg)]]
    cfg["num_labels"] = len(labels)
    cfg["id2label"] = {str(i): name for i, name in enumerate(labels)}
    cfg["label2id"] = {name: i for i, name in enumerate(labels)}
    # HF pools the last token that is not pad_token_id; megacpt pads with it after the text.
    cfg["pad_token_id"] = int(pad_token_id)
    return cfg


def layer_windows(cfg: dict, arch: str, num_layers: int, source: str = "config.json") -> list:
    window = cfg.get("sliding_window")
    if arch in ("MistralForCausalLM", "Phi3ForCausalLM"):
        return [int(window) if window else None] * num_layers
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        types = cfg.get("layer_types")
        if not cfg.get("use_sliding_window") or not window:
            return [None] * num_layers
        if not types:
            mwl = int(cfg.get("max_window_layers", num_layers))
            types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(num_layers)]
        return [int(window) if t == "sliding_attention" else None for t in types]
    if arch in GEMMA:
        types = cfg.get("layer_types")
        if not types:  # the config classes' default patterns: every 2nd (Gemma 2) / 6th (Gemma 3) layer global
            every = 2 if arch == "Gemma2ForCausalLM" else int(cfg.get("sliding_window_pattern",
                                                                     cfg.get("_sliding_window_pattern", 6)))
            types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(num_layers)]
        if "sliding_attention" in types and not window:
            raise UserError(f"{source}: sliding_attention layers need a sliding_window")
        return [int(window) if t == "sliding_attention" else None for t in types]
    return [None] * num_layers


def apply_overrides(args: ModelArgs, max_seq_len=None, rope_theta=None, rope_scaling=None,
                    local_rope_theta=None) -> ModelArgs:
    """Long-context CPT overrides; returns new args (the HF config stays as read). rope_theta and
    rope_scaling change the full-attention layers only: Gemma 3's sliding layers keep their own
    RoPE unless local_rope_theta (model.local_rope_theta) sets its base."""
    changes = {}
    if local_rope_theta is not None:
        if args.local_rope_theta is None:
            raise UserError("model.local_rope_theta: this model has no separate RoPE for sliding-window layers "
                            "(only Gemma 3 has); use model.rope_theta")
        changes["local_rope_theta"] = float(local_rope_theta)
    if max_seq_len is not None:
        changes["max_position_embeddings"] = int(max_seq_len)
        if rope_kind(args.rope_scaling) == "longrope" and args.rope_scaling.get("factor") is None:
            # longrope's attention factor follows max_position_embeddings unless `factor` is
            # given: pin it, so that a longer training window does not change the model.
            changes["rope_scaling"] = {**args.rope_scaling,
                                       "factor": args.max_position_embeddings
                                       / args.rope_scaling["original_max_position_embeddings"]}
    if rope_theta is not None:
        changes["rope_theta"] = float(rope_theta)
    if rope_scaling is not None:
        changes["rope_scaling"] = override_scaling(args, rope_scaling)
    return replace(args, **changes) if changes else args


def override_scaling(args: ModelArgs, rope_scaling: dict) -> dict | None:
    """model.rope_scaling as a checked scaling dict (None for plain RoPE). Unknown keys are errors
    (transformers would warn and ignore a typo). original_max_position_embeddings defaults to the
    model's original context, never to model.max_seq_len; the export writes it out."""
    where = "model.rope_scaling"
    scaling = dict(rope_scaling)
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    kind = scaling.get("rope_type")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UserError(f"{where}: unsupported rope_type {kind!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    known = {"rope_type", *ROPE_KEYS[kind][0], *ROPE_KEYS[kind][1]}
    unknown = sorted(set(scaling) - known)
    if unknown:
        hint = "; set the base with model.rope_theta" if "rope_theta" in unknown else ""
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} for rope_type {kind!r} "
                        f"(known: {', '.join(sorted(known))}){hint}")
    if kind == "default":
        return None
    if "original_max_position_embeddings" in ROPE_KEYS[kind][0]:
        # The model's own: its scaling's where it has one (so a resume, which reads back the
        # export, keeps the length the run started with), else its max_position_embeddings.
        own = (args.rope_scaling or {}).get("original_max_position_embeddings", args.max_position_embeddings)
        scaling.setdefault("original_max_position_embeddings", own)
    check_rope_scaling(scaling, args.rotary_dim, where, args.local_rope_theta is not None)
    return scaling


def hf_config_for(args: ModelArgs, base_cfg: dict) -> dict:
    """The config.json to export: the base config with megacpt's (possibly overridden) values."""
    cfg = dict(base_cfg)
    cfg.pop("quantization_config", None)
    cfg.update(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        rms_norm_eps=args.rms_norm_eps,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=args.tie_word_embeddings,
    )
    arch = architecture(cfg)
    check_family_rope(arch, args.rope_scaling, "model.rope_scaling")
    scaling, local_scaling = exported_scaling(args.rope_scaling), exported_scaling(args.local_rope_scaling)
    if rope_kind(scaling) == "dynamic":
        # transformers' dynamic scaling starts past max_position_embeddings, its only key for that
        # length: the export says where megacpt's starts (model.max_seq_len does not move it).
        cfg["max_position_embeddings"] = args.rope_scaling["original_max_position_embeddings"]
    rp = {"rope_theta": args.rope_theta, "rope_type": "default", **(scaling or {})}
    if arch == "Gemma3ForCausalLM":
        # transformers' per-layer-type structure; the older split keys say the same.
        local = {"rope_theta": args.local_rope_theta, "rope_type": "default", **(local_scaling or {})}
        cfg["rope_parameters"] = {"full_attention": rp, "sliding_attention": local}
        cfg["rope_local_base_freq"] = args.local_rope_theta
    else:
        cfg["rope_parameters"] = rp
    if args.partial_rotary_factor != 1.0 or "partial_rotary_factor" in cfg:
        # Phi3Config takes the top-level value where rope_scaling replaces rope_parameters.
        rp["partial_rotary_factor"] = cfg["partial_rotary_factor"] = args.partial_rotary_factor
    if rope_kind(scaling) in ("llama3", "yarn", "longrope"):
        # transformers lets a top-level original_max_position_embeddings (Phi3Config always has
        # one) win over the one in rope_parameters: both say the same.
        cfg["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    cfg["attention_dropout"] = args.attention_dropout
    if arch == "Phi3ForCausalLM":
        cfg["resid_pdrop"] = args.residual_dropout
    # Older transformers read the split keys; keep them consistent with rope_parameters.
    cfg["rope_theta"] = args.rope_theta
    cfg["rope_scaling"] = scaling
    cfg["torch_dtype"] = cfg.get("torch_dtype") or "float32"
    return cfg


def exported_scaling(scaling: dict | None) -> dict | None:
    """A scaling dict as transformers reads it: dynamic's original_max_position_embeddings is
    megacpt's (transformers takes max_position_embeddings and would warn of an unknown key)."""
    if not scaling:
        return None
    out = dict(scaling)
    if rope_kind(out) == "dynamic":
        out.pop("original_max_position_embeddings", None)
    return out


def hf_name(name: str) -> str:
    return name if name.startswith(("lm_head.", "score.")) else f"model.{name}"


def our_name(hf: str) -> str:
    return hf[len("model.") :] if hf.startswith("model.") else hf



class WeightSource:
    """Where a model's full tensors come from, by megacpt parameter name: keys(), shape(name),
    get(name, rows=None). Subclasses read lazily so a rank can take only its slice."""

    def keys(self):
        raise NotImplementedError

    def __contains__(self, name):
        return name in self.keys()

    def shape(self, name) -> tuple:
        raise NotImplementedError

    def get(self, name, rows: slice | None = None) -> torch.Tensor:
        raise NotImplementedError

    def get_flat_range(self, name, start: int, length: int) -> torch.Tensor:
        """Elements [start, start+length) of the flattened tensor, reading only the rows that hold them."""
        shape = self.shape(name)
        if len(shape) <= 1:
            return self.get(name).reshape(-1)[start : start + length]
        row = 1
        for s in shape[1:]:
            row *= s
        r0, r1 = start // row, -(-(start + length) // row)
        block = self.get(name, slice(r0, r1)).reshape(-1)
        off = start - r0 * row
        return block[off : off + length]


class StateDictWeights(WeightSource):
    """Tensors from a mapping name -> tensor or lazy tensor (anything with .shape and .contiguous())."""

    def __init__(self, state):
        self.state = state

    def keys(self):
        return self.state.keys()

    def shape(self, name) -> tuple:
        return tuple(self.state[name].shape)

    def get(self, name, rows: slice | None = None) -> torch.Tensor:
        t = self.state[name]
        t = t if isinstance(t, torch.Tensor) else t.contiguous()
        return t if rows is None else t[rows]


class ExtraWeights(WeightSource):
    """A source plus tensors it lacks (a new classifier head on a causal LM's weights)."""

    def __init__(self, base: WeightSource, extra: dict):
        self.base, self.extra = base, extra

    def keys(self):
        return list(self.base.keys()) + [k for k in self.extra if k not in self.base.keys()]

    def shape(self, name) -> tuple:
        return tuple(self.extra[name].shape) if name in self.extra else self.base.shape(name)

    def get(self, name, rows: slice | None = None) -> torch.Tensor:
        if name in self.extra:
            return self.extra[name] if rows is None else self.extra[name][rows]
        return self.base.get(name, rows)


class HFWeights(WeightSource):
    """Lazy access to the tensors of an HF directory, by megacpt parameter name."""

    def __init__(self, model_dir):
        self.dir = Path(model_dir)
        self._where: dict[str, Path] = {}
        self._bin: dict[Path, dict] = {}
        self._handles: dict = {}
        st_index = self.dir / "model.safetensors.index.json"
        bin_index = self.dir / "pytorch_model.bin.index.json"
        if st_index.is_file() or bin_index.is_file():
            index = json.loads((st_index if st_index.is_file() else bin_index).read_text())
            for k, f in index["weight_map"].items():
                self._where[our_name(k)] = self.dir / f
        elif (self.dir / "model.safetensors").is_file():
            path = self.dir / "model.safetensors"
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    self._where[our_name(k)] = path
        elif (self.dir / "pytorch_model.bin").is_file():
            path = self.dir / "pytorch_model.bin"
            for k in self._load_bin(path):
                self._where[our_name(k)] = path
        else:
            raise UserError(
                f"{model_dir} has no model.safetensors, sharded safetensors or pytorch_model.bin; "
                f"is it a Hugging Face model directory?"
            )
        self._parts = self._fused_parts()

    def _load_bin(self, path: Path) -> dict:
        if path not in self._bin:
            try:
                # weights_only: a checkpoint is data, never code; mmap keeps RAM at what is touched.
                self._bin[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise UserError(f"cannot load {path} safely (weights_only=True): {refusal_reason(e)}") from None
        return self._bin[path]

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def _fused_parts(self) -> dict:
        """megacpt name → (stored fused name, first row, end row) for each part of a fused tensor
        (Phi-3's qkv_proj and gate_up_proj); the row counts come from config.json."""
        fused = [n for n in self._where if fused_split(n)]
        if not fused:
            return {}
        args = args_from_hf_config(read_hf_config(self.dir), str(self.dir / "config.json"))
        parts = {}
        for name in fused:
            prefix, key = fused_split(name)
            rows = fused_rows(args)[key]
            if self._stored_shape(name)[0] != sum(rows):
                raise UserError(f"{self.dir}: {name} has {self._stored_shape(name)[0]} rows, config implies {sum(rows)}")
            start = 0
            for part, n in zip(FUSED[key], rows):
                parts[f"{prefix}{part}.weight"] = (name, start, start + n)
                start += n
        return parts

    def keys(self):
        # Stored order, each fused tensor replaced by its parts (q, k, v and gate, up stay adjacent).
        out = []
        for name in self._where:
            split = fused_split(name) if self._parts else None
            if split is None:
                out.append(name)
            else:
                out.extend(f"{split[0]}{part}.weight" for part in FUSED[split[1]])
        return out

    def __contains__(self, name):
        return name in self._parts or (name in self._where and not (self._parts and fused_split(name)))

    def shape(self, name) -> tuple:
        if name in self._parts:
            fused, start, stop = self._parts[name]
            return (stop - start, *self._stored_shape(fused)[1:])
        return self._stored_shape(name)

    def get(self, name, rows: slice | tuple | None = None) -> torch.Tensor:
        """The tensor (or an index into it: rows [start, stop) of its first dim, or a tuple of
        slices), as stored; a part of a fused tensor reads only its own rows."""
        if name in self._parts:
            fused, start, stop = self._parts[name]
            return self._stored_get(fused, shift_rows(rows, start, stop))
        return self._stored_get(name, rows)

    def _stored_shape(self, name) -> tuple:
        path = self._where[name]
        if path.suffix == ".safetensors":
            return tuple(self._handle(path).get_slice(hf_name(name)).get_shape())
        return tuple(self._load_bin(path)[hf_name(name)].shape)

    def _stored_get(self, name, rows) -> torch.Tensor:
        path = self._where[name]
        if path.suffix == ".safetensors":
            if rows is None:
                return self._handle(path).get_tensor(hf_name(name))
            return self._handle(path).get_slice(hf_name(name))[rows]
        t = self._load_bin(path)[hf_name(name)]
        return t if rows is None else t[rows]


def fused_split(name: str) -> tuple[str, str] | None:
    """'layers.3.self_attn.qkv_proj.weight' → ('layers.3.', 'self_attn.qkv_proj'); None if not fused."""
    for key in FUSED:
        suffix = f"{key}.weight"
        if name.endswith("." + suffix):
            return name[: -len(suffix)], key
    return None


def fused_rows(args: ModelArgs) -> dict:
    """Rows of each part of a fused tensor, in order."""
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    return {"self_attn.qkv_proj": (q, kv, kv), "mlp.gate_up_proj": (args.intermediate_size,) * 2}


def shift_rows(index, start: int, stop: int):
    """An index into a part (rows [start, stop) of a fused tensor) → the same index into the fused tensor."""
    first, rest = (index[0], index[1:]) if isinstance(index, tuple) and index else (index, ())
    first = first if first is not None else slice(None)
    r0, r1, step = first.indices(stop - start)
    if step != 1:
        raise ValueError("a fused tensor's part is read by contiguous rows only")
    rows = slice(start + r0, start + max(r0, r1))
    return (rows, *rest) if rest else rows


def fuse_parts(items):
    """(name, tensor) pairs with the parts of each fused tensor (Phi-3) concatenated back into it,
    emitted when its last part arrives; other tensors pass through."""
    part_of = {f"{p}.weight": (key, i) for key, parts in FUSED.items() for i, p in enumerate(parts)}
    pending: dict = {}
    for name, t in items:
        hit = next(((name[: -len(sfx)], *v) for sfx, v in part_of.items() if name.endswith("." + sfx)), None)
        if hit is None:
            yield name, t
            continue
        prefix, key, i = hit
        parts = pending.setdefault(prefix + key, [None] * len(FUSED[key]))
        parts[i] = t
        if all(p is not None for p in parts):
            yield f"{prefix}{key}.weight", torch.cat(pending.pop(prefix + key), dim=0)
    if pending:
        raise RuntimeError(f"incomplete fused tensors (parts missing): {', '.join(sorted(pending))}")


def expected_names(model: torch.nn.Module) -> list[str]:
    """Parameter names the HF files must provide (a tied head shares the embedding's tensor)."""
    return [n for n, _ in model.named_parameters()]


def check_weights(weights: HFWeights, model: torch.nn.Module, model_dir) -> None:
    missing = [n for n in expected_names(model) if n not in weights]
    if missing:
        raise UserError(
            f"{model_dir}: weights missing for {len(missing)} parameters (first: {missing[0]}); "
            f"does config.json match the weight files?"
        )


def as_weights(source) -> WeightSource:
    return source if isinstance(source, WeightSource) else HFWeights(source)


def load_full_state(model: torch.nn.Module, source) -> None:
    """Load every parameter whole (no ZeRO-3 partitioning); the model may live on the meta device.
    `source` is an HF dir or a WeightSource."""
    weights = as_weights(source)
    model_dir = getattr(weights, "dir", "checkpoint")
    check_weights(weights, model, model_dir)
    state = {}
    for name, p in model.named_parameters():
        t = weights.get(name)
        if tuple(t.shape) != tuple(p.shape):
            raise UserError(f"{model_dir}: {name} has shape {tuple(t.shape)}, config implies {tuple(p.shape)}")
        state[name] = t.to(p.dtype)
    # strict=False: the tied head is absent from named_parameters() de-duplication but present in state_dict.
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.args.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if model.args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def save_hf(state: dict, args: ModelArgs, base_cfg: dict, out_dir, source_dir=None,
            dtype: torch.dtype | None = None, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write an HF directory atomically (megacpt.atomic.write_dir: a temp dir, renamed at the end).

    `state` maps megacpt names to full tensors (or is an iterable of (name, tensor) pairs, read
    one at a time); with tied embeddings lm_head.weight is omitted.
    """
    atomic.write_dir(Path(out_dir), lambda tmp: _fill_hf(tmp, state, args, base_cfg, source_dir, dtype,
                                                         max_shard_bytes))


def _fill_hf(tmp: Path, state, args: ModelArgs, base_cfg: dict, source_dir, dtype, max_shard_bytes: int) -> None:
    cfg = hf_config_for(args, base_cfg)
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    shards, cur, cur_bytes = [], {}, 0
    items = state.items() if hasattr(state, "items") else state
    if architecture(cfg) in FUSED_ARCHITECTURES:
        items = fuse_parts(items)
    for name, t in items:
        # A classifier's HF class has no LM head (megacpt keeps it, untrained, for the shapes).
        if name == "lm_head.weight" and (args.tie_word_embeddings or args.num_labels):
            continue
        t = t.detach().to("cpu", dtype or t.dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if cur and cur_bytes + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[hf_name(name)] = t
        cur_bytes += nbytes
    shards.append(cur)
    _write_shards(tmp, shards)
    if source_dir is not None:
        for fname in TOKENIZER_FILES:
            src = Path(source_dir) / fname
            if src.is_file():
                shutil.copy2(src, tmp / fname)


def _write_shards(tmp: Path, shards: list[dict]) -> None:
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

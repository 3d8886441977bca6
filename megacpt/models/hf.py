"""Hugging Face directory <-> megacpt: config.json, weight files, tied embeddings, dtypes.

Reading is lazy and sliced (safetensors `get_slice`), so a rank can read only the part of a
tensor it keeps. Writing produces safetensors shards plus an index, and a config.json that
`transformers` loads, with the long-context overrides written in.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megacpt.errors import UserError
from megacpt.models.llama import SUPPORTED_ROPE_TYPES, ModelArgs
from megacpt.safe_load import refusal_reason

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
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


def rope_params(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers 5 `rope_parameters` or the older split keys."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and rp:
        theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg.get("rope_scaling") or {})
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    return theta, scaling


def args_from_hf_config(cfg: dict, source: str = "config.json") -> ModelArgs:
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{source}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    try:
        h, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        nl = int(cfg["num_hidden_layers"])
        theta, scaling = rope_params(cfg)
        if scaling and scaling.get("rope_type") not in SUPPORTED_ROPE_TYPES:
            raise UserError(
                f"{source}: unsupported rope_type {scaling.get('rope_type')!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UserError(f"{source}: unsupported hidden_act {cfg.get('hidden_act')!r} (only silu)")
        windows = layer_windows(cfg, arch, nl)
        return ModelArgs(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=h,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=nl,
            num_heads=nh,
            num_kv_heads=int(cfg.get("num_key_value_heads") or nh),
            head_dim=int(cfg.get("head_dim") or h // nh),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama/Mistral only with attention_bias.
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            layer_windows=windows,
        )
    except KeyError as e:
        raise UserError(f"{source}: missing key {e.args[0]!r}") from None


def layer_windows(cfg: dict, arch: str, num_layers: int) -> list:
    window = cfg.get("sliding_window")
    if arch == "MistralForCausalLM":
        return [int(window) if window else None] * num_layers
    if arch == "Qwen2ForCausalLM":
        types = cfg.get("layer_types")
        if not cfg.get("use_sliding_window") or not window:
            return [None] * num_layers
        if not types:
            mwl = int(cfg.get("max_window_layers", num_layers))
            types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(num_layers)]
        return [int(window) if t == "sliding_attention" else None for t in types]
    return [None] * num_layers


def apply_overrides(args: ModelArgs, max_seq_len=None, rope_theta=None, rope_scaling=None) -> ModelArgs:
    """Long-context CPT overrides; returns new args (the HF config stays as read)."""
    changes = {}
    if max_seq_len is not None:
        changes["max_position_embeddings"] = int(max_seq_len)
    if rope_theta is not None:
        changes["rope_theta"] = float(rope_theta)
    if rope_scaling is not None:
        scaling = dict(rope_scaling)
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type") not in SUPPORTED_ROPE_TYPES:
            raise UserError(
                f"model.rope_scaling: unsupported rope_type {scaling.get('rope_type')!r} "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        changes["rope_scaling"] = None if scaling.get("rope_type") == "default" else scaling
    return replace(args, **changes) if changes else args


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
    rp = {"rope_theta": args.rope_theta, "rope_type": "default"}
    rp.update(args.rope_scaling or {})
    cfg["rope_parameters"] = rp
    # Older transformers read the split keys; keep them consistent with rope_parameters.
    cfg["rope_theta"] = args.rope_theta
    cfg["rope_scaling"] = dict(args.rope_scaling) if args.rope_scaling else None
    cfg["torch_dtype"] = cfg.get("torch_dtype") or "float32"
    return cfg


def hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


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

    def keys(self):
        return self._where.keys()

    def __contains__(self, name):
        return name in self._where

    def shape(self, name) -> tuple:
        path = self._where[name]
        if path.suffix == ".safetensors":
            return tuple(self._handle(path).get_slice(hf_name(name)).get_shape())
        return tuple(self._load_bin(path)[hf_name(name)].shape)

    def get(self, name, rows: slice | None = None) -> torch.Tensor:
        """The tensor (or rows [start, stop) of its first dim), as stored."""
        path = self._where[name]
        if path.suffix == ".safetensors":
            if rows is None:
                return self._handle(path).get_tensor(hf_name(name))
            return self._handle(path).get_slice(hf_name(name))[rows]
        t = self._load_bin(path)[hf_name(name)]
        return t if rows is None else t[rows]


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
    """Write an HF directory atomically (into a temp dir, renamed at the end).

    `state` maps megacpt names to full tensors (or is an iterable of (name, tensor) pairs, read
    one at a time); with tied embeddings lm_head.weight is omitted.
    """
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        cfg = hf_config_for(args, base_cfg)
        if dtype is not None:
            cfg["torch_dtype"] = str(dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        shards, cur, cur_bytes = [], {}, 0
        items = state.items() if hasattr(state, "items") else state
        for name, t in items:
            if args.tie_word_embeddings and name == "lm_head.weight":
                continue
            t = t.detach().to("cpu", dtype or t.dtype).contiguous()
            nbytes = t.numel() * t.element_size()
            if cur and cur_bytes + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, cur_bytes = {}, 0
            cur[hf_name(name)] = t
            cur_bytes += nbytes
        shards.append(cur)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                for k, t in shard.items():
                    weight_map[k] = fname
                    total += t.numel() * t.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if source_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(source_dir) / fname
                if src.is_file():
                    shutil.copy2(src, tmp / fname)
        # safetensors writes 0600 files; an exported model is meant to be shared (umask decides).
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

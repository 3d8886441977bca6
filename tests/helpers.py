"""Small builders shared by tests: tiny HF model dirs, token shards, configs, launches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_hf_model(path, arch="llama", tied=False, vocab=128, hidden=32, layers=2, heads=4, kv_heads=2,
                  inter=64, max_pos=128, seed=0, perturb=False, **extra) -> Path:
    """A randomly initialised transformers model saved as an HF dir (the independent reference).

    arch: llama, mistral, qwen2, qwen3, gemma2, gemma3 (text-only Gemma3TextConfig), olmo2, phi3.
    perturb: add noise to every parameter before saving, norms included (HF initialises Llama's
    norms to 1 and Gemma's to 0, which would hide a wrong norm form or a missing norm).
    """
    import torch
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "gemma2": transformers.Gemma2Config, "gemma3": transformers.Gemma3TextConfig,
           "olmo2": transformers.Olmo2Config, "phi3": transformers.Phi3Config}[arch]
    cfg = cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
              tie_word_embeddings=tied, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.02))
    path = Path(path)
    model.save_pretrained(path)
    return path


def write_shard(prefix, docs, dtype=np.uint16) -> str:
    from megacpt.data.indexed import IndexedDatasetWriter

    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(np.asarray(d))
    return str(prefix)


def random_docs(n_docs, vocab, seed, min_len=5, max_len=60, eos=None):
    rng = np.random.default_rng(seed)
    eos = vocab - 1 if eos is None else eos
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(min_len, max_len))
        docs.append(np.concatenate([rng.integers(0, vocab - 1, n), [eos]]))
    return docs


def write_config(path, data: dict) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_run_config(tmp, model_dir, run_dir, *, steps=5, zero=0, gb=4, mb=1, seq=16, vocab=128, **over) -> dict:
    tmp = Path(tmp)
    new = tmp / "data" / "new"
    old = tmp / "data" / "old"
    if not Path(f"{new}.idx").exists():
        (tmp / "data").mkdir(parents=True, exist_ok=True)
        write_shard(new, random_docs(80, vocab, 1))
        write_shard(old, random_docs(80, vocab, 2))
        write_shard(f"{new}_valid", random_docs(10, vocab, 3))
        write_shard(f"{old}_valid", random_docs(10, vocab, 4))
    cfg = {
        "run_dir": str(run_dir),
        "seed": 7,
        "model": {"init_from": str(model_dir)},
        "data": {
            "seq_len": seq,
            "train": [{"name": "new", "path": str(new), "weight": 0.75},
                      {"name": "replay", "path": str(old), "weight": 0.25}],
            "valid": [{"name": "new", "path": f"{new}_valid"}, {"name": "original", "path": f"{old}_valid"}],
            "valid_tokens": 128,
        },
        "train": {"steps": steps, "micro_batch_size": mb, "global_batch_size": gb, "eval_interval": 100,
                  "log_interval": 1},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "parallel": {"zero_stage": zero},
        "precision": "fp32",
        "checkpoint": {"interval": 100, "keep": 2},
        "tensorboard": False,
    }
    for k, v in over.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return cfg


def cpu_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONHASHSEED": "0"})
    # DeepSpeed JIT-builds its CPU shm all-reduce op into TORCH_EXTENSIONS_DIR with this venv's
    # paths baked in: a cache shared with other checkouts' venvs is rebuilt (~20 s) at every switch.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.executable).parent.parent / "torch_extensions"))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    # Trackers a test turns on stay local: W&B offline, MLflow in the run dir.
    env.pop("WANDB_MODE", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def launch(nproc: int, module_args: list[str], timeout=600, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run `python -m megacpt.train ...` (nproc=1) or under the deepspeed launcher (nproc>1)."""
    env = env or cpu_env()
    if nproc == 1:
        cmd = [sys.executable, "-m", "megacpt.train", *module_args]
    else:
        ds = Path(sys.executable).parent / "deepspeed"
        cmd = [str(ds), "--num_gpus", str(nproc), "--master_port", str(free_port()), "--module", "megacpt.train",
               *module_args]
    return subprocess.run(cmd, env=env, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)


def run_ok(nproc: int, cfg_path, *sets: str) -> subprocess.CompletedProcess:
    """Launch a training run with `--set` overrides; fail the test with its output if it fails."""
    args = [str(cfg_path)]
    for s in sets:
        args += ["--set", s]
    r = launch(nproc, args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir) -> list[dict]:
    import json

    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def train_losses(run_dir) -> dict:
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SFT_WORDS = ("what is the capital of france paris germany berlin spain madrid italy rome add two and three "
             "five one four six seven eight nine ten answer question please say hello world yes no color "
             "sky blue grass green").split()


def tiny_chat_tokenizer(path, chat_template=True):
    """A small byte-level BPE with ChatML special tokens (and template), saved with save_pretrained."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rnd = random.Random(0)
    text = [" ".join(rnd.choice(SFT_WORDS) for _ in range(12)) for _ in range(300)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(text, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                  pad_token="<|endoftext|>")
    if chat_template:
        tok.chat_template = CHATML
    tok.save_pretrained(str(path))
    return tok


def sft_examples(n, seed=0):
    """JSON-able SFT records, half prompt/response and half chat messages."""
    import random

    rnd = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rnd.choice(SFT_WORDS) for _ in range(rnd.randint(2, 6)))
        a = " ".join(rnd.choice(SFT_WORDS) for _ in range(rnd.randint(1, 4)))
        if i % 2:
            out.append({"prompt": q + "?", "response": " " + a})
        else:
            out.append({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": q},
                                     {"role": "assistant", "content": a}]})
    return out


def write_jsonl(path, records) -> str:
    import json

    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def word_tokenizer(model_dir, vocab=128):
    """A word-level HF tokenizer saved into model_dir whose ids are the tiny models' vocabulary:
    id 0 is EOS ("<|endoftext|>"), id i is the word "w<i>" (decoding joins words with spaces)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    hf.save_pretrained(str(model_dir))
    return hf


def word_tasks(out_dir, vocab=128, seed=0, n=8) -> Path:
    """Three lm-eval tasks over word_tokenizer's words, as local YAML + JSON Lines (absolute paths:
    lm-eval resolves data_files against the working directory): `tiny_choice` (multiple choice,
    acc/acc_norm), `tiny_gen` (greedy generation of 3 words, exact_match) and `tiny_roll` (rolling
    loglikelihood, word_perplexity: a continuous number that every item moves)."""
    import json
    import random

    rnd = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def words(k):
        return " ".join(f"w{rnd.randrange(1, vocab)}" for _ in range(k))

    with open(out / "tiny_choice.jsonl", "w") as f:
        for _ in range(n):
            f.write(json.dumps({"ctx": words(rnd.randint(3, 9)), "choices": [words(2), words(3), words(1)],
                                "label": rnd.randrange(3)}) + "\n")
    with open(out / "tiny_gen.jsonl", "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": words(rnd.randint(2, 7)), "answer": words(1)}) + "\n")
    with open(out / "tiny_roll.jsonl", "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": words(rnd.randint(5, 20))}) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    (out / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\n{common}dataset_kwargs:\n  data_files:\n    test: {out / 'tiny_choice.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{ctx}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (out / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {out / 'tiny_gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: ' {{answer}}'\n"
        "generation_kwargs:\n  until: ['w7']\n  max_gen_toks: 3\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (out / "tiny_roll.yaml").write_text(
        f"task: tiny_roll\n{common}dataset_kwargs:\n  data_files:\n    test: {out / 'tiny_roll.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n")
    return out


def checkpoint_tensors(ckpt_dir) -> dict:
    """Every tensor of a checkpoint's .pt files, by file/key path (for bit-identity checks)."""
    import torch

    from megacpt.safe_load import _allowlist

    out = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)

    for f in sorted(Path(ckpt_dir).glob("*.pt")):
        with torch.serialization.safe_globals(_allowlist()):
            walk(f.name, torch.load(f, map_location="cpu", weights_only=True))
    return out


def assert_refused(capsys, argv: list, message: str, not_created=None) -> None:
    """`megacpt ARGV` in-process exits 2 with one line containing `message`, and writes nothing at
    `not_created`."""
    from megacpt.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    if not_created is not None:
        assert not Path(not_created).exists()


def assert_runs_match(reference, other, steps, fingerprints: bool = True) -> None:
    """Two runs' losses and clipped grad norms agree at every step (rtol 1e-5, atol 1e-6, the
    tolerance of every layout-vs-one-process check), and they saw the same samples."""
    import torch

    a, b = train_losses(reference), train_losses(other)
    steps = list(steps)
    for key in ("loss", "grad_norm"):
        ta = torch.tensor([a[s][key] for s in steps], dtype=torch.float64)
        tb = torch.tensor([b[s][key] for s in steps], dtype=torch.float64)
        torch.testing.assert_close(tb, ta, rtol=1e-5, atol=1e-6)
    if fingerprints:
        assert [a[s]["samples_fingerprint"] for s in steps] == [b[s]["samples_fingerprint"] for s in steps]


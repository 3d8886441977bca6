"""task: classify — labelled JSON Lines → fixed-length rows for a sequence classifier.

A line is `{"text": ..., "label": ...}` or a pair `{"text_a": ..., "text_b": ..., "label": ...}`
(the tokenizer joins the pair as its model expects). Labels are strings (numbers are read as their
text); the head's order is `classify.labels`, or the sorted labels of the training files, fixed
once and written into the model's config (id2label). A row is the example's tokens, cut to
`seq_len` from the end, then padded with the pad id; the classifier pools the last real token,
as transformers' *ForSequenceClassification does with that pad id.

The order of examples is a pure function of (files, tokenizer, seq_len, seed): epoch e is a
permutation seeded by (seed, e) of all training examples, so resume and other world sizes see
the same samples, as for CPT.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megacpt.errors import ConfigError, DataError


@dataclass
class Example:
    ids: np.ndarray  # int64, at most seq_len tokens
    label: str
    where: str  # file:line


@dataclass
class LabelledSet:
    name: str
    ids: np.ndarray  # (n, seq_len) int64, padded
    lengths: np.ndarray  # (n,) real tokens per row
    labels: np.ndarray  # (n,) label index


def load_tokenizer(path):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer  # heavy (seconds): only classification runs need it

    if not path or not Path(path).is_dir():
        raise ConfigError(f"classify tokenizer dir {path} does not exist; set classify.tokenizer to a dir with "
                          f"tokenizer files")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load a tokenizer from {path} ({first}); set classify.tokenizer") from None


def pad_id(tok) -> int:
    """The id padding rows: the tokenizer's pad token, else its EOS (which HF then treats as pad)."""
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pid is None:
        raise ConfigError("the tokenizer defines neither a pad nor an EOS token; a classifier needs one to mark "
                          "where padding starts: use a tokenizer with pad_token")
    return int(pid)


def _files(path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".jsonl")
        if files:
            return files
        raise DataError(f"{path}: directory holds no .jsonl files; classification data is JSON Lines of "
                        f'{{"text", "label"}}')
    if not p.is_file():
        raise DataError(f"{path}: no such classification data file; point the path at a .jsonl file or a directory")
    return [p]


def _parse(line: str, where: str) -> tuple[tuple, str]:
    try:
        rec = json.loads(line)
    except ValueError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg}); one JSON object per line") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object with text and label")
    label = rec.get("label")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label).strip() == "":
        raise DataError(f"{where}: label must be a non-empty string or an integer, got {label!r}")
    if "text" in rec:
        texts = (rec["text"],)
    elif "text_a" in rec and "text_b" in rec:
        texts = (rec["text_a"], rec["text_b"])
    else:
        raise DataError(f"{where}: needs \"text\" (or \"text_a\" and \"text_b\") besides \"label\"")
    if not all(isinstance(t, str) and t for t in texts):
        raise DataError(f"{where}: the text fields must be non-empty strings")
    return texts, str(label)


def read_examples(path, tok, seq_len: int, vocab_size: int) -> tuple[list[Example], int]:
    """Every example of a file or directory, and how many were cut to seq_len."""
    out, cut = [], 0
    for f in _files(path):
        with open(f, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{f}:{n}"
                texts, label = _parse(line, where)
                ids = tok(*texts)["input_ids"]
                if len(ids) > seq_len:
                    ids, cut = ids[:seq_len], cut + 1
                if max(ids) >= vocab_size:
                    raise DataError(f"{where}: token id {max(ids)} ≥ model vocab {vocab_size}; the tokenizer does "
                                    f"not belong to the model")
                out.append(Example(np.asarray(ids, dtype=np.int64), label, where))
    if not out:
        raise DataError(f"{path}: no examples")
    return out, cut


def as_set(name: str, examples: list[Example], labels: list[str], seq_len: int, pad: int) -> LabelledSet:
    index = {lab: i for i, lab in enumerate(labels)}
    ids = np.full((len(examples), seq_len), pad, dtype=np.int64)
    lengths = np.zeros(len(examples), dtype=np.int64)
    ys = np.zeros(len(examples), dtype=np.int64)
    for i, ex in enumerate(examples):
        if ex.label not in index:
            raise DataError(f"{ex.where}: label {ex.label!r} is not among the classifier's labels {labels}; add it "
                            f"to classify.labels (before training starts) or fix the line")
        ids[i, : len(ex.ids)] = ex.ids
        lengths[i], ys[i] = len(ex.ids), index[ex.label]
    return LabelledSet(name, ids, lengths, ys)


class ClassifyDataset:
    """Sample i of an endless stream: epoch i // n, a permutation of the n examples seeded by (seed, epoch)."""

    def __init__(self, data: LabelledSet, seed: int):
        self.data, self.seed = data, int(seed)
        self._perm: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.data.labels)

    def index(self, i: int) -> int:
        n = len(self.data.labels)
        e = i // n
        if e not in self._perm:
            self._perm = {e: np.random.default_rng(np.random.SeedSequence([self.seed, e])).permutation(n)}
        return int(self._perm[e][i % n])

    def rows(self, indices: list[int]) -> dict:
        d = self.data
        return {"input_ids": d.ids[indices], "pool_index": d.lengths[indices] - 1, "labels": d.labels[indices]}

    def tokens_per_source(self, num_consumed_samples: int) -> dict[str, int]:
        """Real (unpadded) tokens of samples [0, n): whole epochs, then the start of the next."""
        n, lengths = len(self), self.data.lengths
        epochs, rest = divmod(int(num_consumed_samples), n)
        part = [self.index(epochs * n + j) for j in range(rest)]
        return {self.data.name: int(epochs * lengths.sum() + lengths[part].sum())}


def rank_batches(dataset: ClassifyDataset, first_sample: int, mb: int, gas: int, dp_rank: int,
                 dp_size: int) -> list[dict]:
    """This rank's micro-batches of a global batch, in the same sample layout as CPT's."""
    import torch  # heavy: the rest of the data layer runs on numpy alone

    out = []
    for m in range(gas):
        base = first_sample + m * mb * dp_size + dp_rank * mb
        idx = [dataset.index(base + j) for j in range(mb)]
        batch = {k: torch.from_numpy(v) for k, v in dataset.rows(idx).items()}
        batch["fingerprint"] = sum(zlib.crc32(dataset.data.ids[i].tobytes()) for i in idx)
        out.append(batch)
    return out


def label_names(cfg, train: list[Example]) -> list[str]:
    return list(cfg.classify.labels) or sorted({e.label for e in train})


def build(cfg, phases, vocab_size: int, tokenizer_dir) -> tuple[list[str], int, dict, int]:
    """Sets each phase's dataset; returns the labels, the pad id, the held-out sets (plus the
    training sample of the gap as `train` when asked) and how many examples were cut."""
    if not cfg.data.train:
        raise ConfigError("data.train is empty: add a {name, path} source of {text, label} JSON Lines")
    tok = load_tokenizer(cfg.classify.tokenizer or tokenizer_dir)
    pad, S = pad_id(tok), cfg.data.seq_len
    cache: dict = {}

    def examples(src):
        if src.path not in cache:
            cache[src.path] = read_examples(src.path, tok, S, vocab_size)
        return cache[src.path][0]

    every = [e for p in phases for s in p.sources for e in examples(s)]
    labels = label_names(cfg, every)
    for p in phases:
        exs = [e for s in p.sources for e in examples(s)]
        p.dataset = ClassifyDataset(as_set("+".join(s.name for s in p.sources), exs, labels, S, pad), p.seed)
    sets = {v.name: as_set(v.name, examples(v), labels, S, pad) for v in cfg.data.valid}
    if cfg.classify.gap_examples and sets:
        main = phases[0].dataset
        idx = [main.index(i) for i in range(min(cfg.classify.gap_examples, len(main)))]
        d = main.data
        sets["train"] = LabelledSet("train", d.ids[idx], d.lengths[idx], d.labels[idx])
    return labels, pad, sets, sum(c[1] for c in cache.values())


def predictions_metrics(pred: np.ndarray, gold: np.ndarray) -> dict:
    """Accuracy and macro-F1 (scikit-learn's f1_score(average="macro"): the classes present in
    gold or predictions, F1 0 where a class has no true positives)."""
    acc = float((pred == gold).mean()) if len(gold) else 0.0
    f1s = []
    for c in np.union1d(pred, gold):
        tp = int(((pred == c) & (gold == c)).sum())
        fp, fn = int(((pred == c) & (gold != c)).sum()), int(((pred != c) & (gold == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": float(np.mean(f1s)) if f1s else 0.0}


__all__ = ["ClassifyDataset", "LabelledSet", "build", "predictions_metrics", "rank_batches"]

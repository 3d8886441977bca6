"""The run as a sequence of phases, and where the data stands at any step.

The run is the implicit `main` phase (train.steps on data.train) followed by the declared
`phases`. Global batch k of a phase is that phase's samples [k·G, (k+1)·G), split over
data-parallel ranks by micro-batch; the resume point is just the global step, from which the
phase and its consumed samples follow, whatever the world size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from megacpt.config import BatchShape, Config, ScheduleConfig, TrainSource, batch_shapes
from megacpt.data.dataset import BlendedDataset, Source
from megacpt.errors import ConfigError
from megacpt.train.schedule import lr_at


@dataclass
class Phase:
    name: str
    start: int  # first global step
    steps: int
    sources: list[TrainSource]
    schedule: ScheduleConfig
    lr: float
    min_lr: float
    seed: int
    trainable: str = "all"  # all | embeddings
    shape: BatchShape | None = None  # seq_len, micro and global batch
    dataset: object = None

    @property
    def seq_len(self) -> int:
        return self.shape.seq_len

    @property
    def global_batch(self) -> int:
        return self.shape.global_batch_size

    @property
    def micro_batch(self) -> int:
        return self.shape.micro_batch_size


def plan_phases(cfg: Config) -> list[Phase]:
    shapes = batch_shapes(cfg)
    phases = [Phase("main", 0, cfg.train.steps, list(cfg.data.train), cfg.schedule, cfg.optim.lr,
                    cfg.optim.min_lr, cfg.seed, cfg.train.trainable, shapes[0])]
    for p, shape in zip(cfg.phases, shapes[1:]):
        prev = phases[-1]
        sources = list(p.data.train) if p.data and p.data.train else prev.sources
        # Each phase has its own order: a pure function of (phase config, seed).
        seed = int.from_bytes(hashlib.sha256(f"{cfg.seed}/{p.name}".encode()).digest()[:4], "little")
        phases.append(Phase(p.name, prev.start + prev.steps, p.steps, sources, p.schedule or cfg.schedule,
                            p.lr if p.lr is not None else cfg.optim.lr,
                            p.min_lr if p.min_lr is not None else cfg.optim.min_lr, seed,
                            p.trainable or cfg.train.trainable, shape))
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    for p in phases:
        if step < p.start + p.steps:
            return p
    return phases[-1]


def build_datasets(cfg: Config, phases: list[Phase], vocab_size: int) -> None:
    if not cfg.data.train:
        raise ConfigError("data.train is empty: add at least one {name, path, weight} source")
    for p in phases:
        srcs = [Source(s.name, s.path, s.weight) for s in p.sources]
        # Room for batches skipped after non-finite rollbacks (samples are prefix-stable).
        n = (p.steps + cfg.train.max_rollbacks) * p.global_batch
        p.dataset = BlendedDataset(srcs, p.seq_len, p.seed, n, vocab_size=vocab_size)


def lr_for(phases: list[Phase], step: int) -> float:
    p = phase_at(phases, step)
    s = p.schedule
    return lr_at(step - p.start, p.steps, kind=s.kind, lr=p.lr, min_lr=p.min_lr, warmup_steps=s.warmup_steps,
                 decay_fraction=s.decay_fraction, decay_shape=s.decay_shape)


def consumed_samples(phases: list[Phase], step: int) -> int:
    """Sequences trained on up to `step` (phases may differ in global batch)."""
    return sum(min(max(step - p.start, 0), p.steps) * p.global_batch for p in phases)


def tokens_per_source(phases: list[Phase], step: int, skips: dict | None = None) -> dict:
    """Tokens drawn from each source up to `step` (skipped batches included: they were read)."""
    out: dict = {}
    for p in phases:
        k = min(max(step - p.start, 0), p.steps)
        skipped = (skips or {}).get(p.name, [])
        done = (data_batch_index(k - 1, skipped) + 1) * p.global_batch if k > 0 else 0
        for name, n in p.dataset.tokens_per_source(done).items():
            out[name] = out.get(name, 0) + n
    return out


def data_batch_index(k: int, skipped: list[int]) -> int:
    """The k-th batch index of a phase that was not skipped (after a non-finite rollback)."""
    idx = k
    for s in sorted(skipped):
        if s <= idx:
            idx += 1
        else:
            break
    return idx

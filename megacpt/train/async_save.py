"""Asynchronous checkpoints (`checkpoint.async: true`): the save call takes a snapshot of this
rank's checkpoint files in host memory and returns; the files are written while training goes on.

One save, on every rank:
  snapshot  engine.save_checkpoint runs as usual, with DeepSpeed's checkpoint engine wrapped
            (_Snapshot): each file it would write is serialised by that same engine into memory
            (the bytes torch.save writes), and so is this rank's RNG state. From then on training
            may change every tensor. The snapshot is a second copy of the rank's checkpoint state
            in host memory, freed file by file as the writer finishes each.
  write     a thread writes the files into checkpoints/.tmp-step_N, fsyncs them, then leaves a
            marker `.tmp-written-rank_R` there.
  publish   a thread on rank 0 waits for every rank's marker, removes them and does what a
            synchronous save does after its barrier, with the same functions (checkpoint.py):
            metadata, manifest, rename, `latest`, pruning. A crash at any point leaves the last
            published checkpoint named by `latest`; temporary dirs are removed at the next start.
  agree     before the next save, at the end of the run and before a rollback, AsyncSaver.wait
            (a collective) finishes the save: each rank joins its writer, the ranks all-reduce
            whether every write succeeded, rank 0 joins its publisher and the ranks agree on its
            outcome. A failure anywhere raises CheckpointError on every rank, as a synchronous
            save would, and the previous checkpoint stays `latest`.
  abandon   after an error (AsyncSaver.abandon, no collective: another rank may be gone) each rank
            finishes writing its files; rank 0 publishes only if every rank's marker is there,
            else the temporary dir stays unpublished.

The markers let rank 0 publish as soon as the last rank's files are on disk without a collective
the training steps would have to meet (the per-step collectives stay as they are). They need the
checkpoint dir to be one filesystem for all ranks, which the manifest already does (rank 0 hashes
every rank's files).
"""

from __future__ import annotations

import copy
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from megacpt.errors import ConfigError
from megacpt.train import checkpoint as ckpt

WRITTEN = ".tmp-written-rank_"  # + rank: this rank's files are on disk (".tmp-": never in a manifest)
_POLL_S = 0.1
# Once every rank has said its files are written, how long rank 0 waits to see their markers (a
# shared filesystem shows them at once; a node-local checkpoint dir never does).
MARK_GRACE_S = 120.0


class _Parts:
    """A file open for writing that keeps what is written in memory, as a list of byte strings."""

    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))  # a copy: torch.save hands over views of the live tensors
        return len(self.parts[-1])

    def flush(self) -> None:
        pass


class _Snapshot(ckpt._RecordingWrites):
    """DeepSpeed checkpoint engine proxy: files serialised into memory instead of written; the
    first error recorded (as a synchronous save records it) so that DeepSpeed's barriers are met."""

    def __init__(self, inner):
        super().__init__(inner)
        self.files: list = []  # [(path, [bytes, ...])], in the order DeepSpeed saved them

    def _write(self, state_dict, path):
        buf = _Parts()
        self.inner.save(state_dict, buf)  # TorchCheckpointEngine: torch.save with its settings
        self.files.append((Path(path), buf.parts))

    def add(self, obj, path: Path) -> None:
        """A file of megacpt's own (the RNG state), saved as the synchronous path saves it."""
        if self.error is None:
            buf = _Parts()
            torch.save(obj, buf)
            self.files.append((path, buf.parts))


def write_file(path: Path, parts: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for p in parts:
            f.write(p)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class _Job:
    root: Path
    step: int
    files: list
    error: BaseException | None = None  # this rank's snapshot or write failed
    publish_error: BaseException | None = None  # rank 0: metadata, manifest, rename or `latest` failed
    cancel: threading.Event = field(default_factory=threading.Event)
    agreed_at: float | None = None  # rank 0: when every rank said its files are written
    threads: list = field(default_factory=list)  # the writer, and on rank 0 the publisher

    @property
    def tmp(self) -> Path:
        return self.root / f".tmp-{ckpt.tag_for(self.step)}"


class AsyncSaver:
    """One per training process: at most one save in flight."""

    def __init__(self, engine, rank: int, world: int, say=print):
        if not isinstance(engine.checkpoint_engine, TorchCheckpointEngine):
            raise ConfigError(f"checkpoint.async needs DeepSpeed's torch checkpoint engine, not "
                              f"{type(engine.checkpoint_engine).__name__}; set checkpoint.async to false or "
                              f"drop the DeepSpeed checkpoint settings that choose another engine")
        self.rank, self.world, self.say = rank, world, say
        self.job: _Job | None = None

    def save(self, engine, ckpt_root, step: int, state: dict, hf_config: dict, keep: int) -> Path:
        """Collective: finish the save in flight, snapshot this rank's files and start writing them.
        Returns the path the checkpoint gets when it is published."""
        self.wait()
        root, tag = Path(ckpt_root), ckpt.tag_for(step)
        tmp = ckpt.begin(root, tag, self.rank)
        snap = _Snapshot(engine.checkpoint_engine)
        engine.checkpoint_engine = snap
        error = None
        try:
            engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
            snap.add(ckpt._rng_state(), tmp / "rng" / f"rank_{self.rank:05d}.pt")
        except ckpt._WRITE_ERRORS as e:  # DeepSpeed's own writes (directories, its recovery script)
            error = e
        finally:
            engine.checkpoint_engine = snap.inner
        job = _Job(root, step, snap.files, snap.error or error)
        job.threads.append(threading.Thread(target=_write, args=(job, self.rank), name="megacpt-ckpt-write",
                                            daemon=True))
        if self.rank == 0:  # the metadata too as of now (the state holds the run's live skip lists)
            meta = copy.deepcopy((hf_config, state))
            job.threads.append(threading.Thread(target=_publish, args=(job, self.world, *meta, keep),
                                                name="megacpt-ckpt-publish", daemon=True))
        for t in job.threads:
            t.start()
        self.job = job
        return root / tag

    def wait(self) -> Path | None:
        """Collective: finish the save in flight (None when there is none) and return its path;
        CheckpointError on every rank when any rank's part failed."""
        job, self.job = self.job, None
        if job is None:
            return None
        writer, *publisher = job.threads
        writer.join()
        ok = ckpt.all_succeeded(job.error)
        if publisher:
            if ok:
                job.agreed_at = time.monotonic()
            else:  # some rank wrote no marker: stop waiting for it
                job.cancel.set()
            publisher[0].join()
        error = job.error
        if ok:
            error = job.publish_error
            ok = ckpt.all_succeeded(error)
        if not ok:
            raise ckpt.failed(error, job.root, job.step, self.rank)
        path = job.root / ckpt.tag_for(job.step)
        self.say(f"checkpoint saved: {path}")
        return path

    def abandon(self) -> None:
        """After an error, without collectives: this rank's files are finished; rank 0 publishes
        the checkpoint only if every rank's marker is already there."""
        job, self.job = self.job, None
        if job is None:
            return
        writer, *publisher = job.threads
        writer.join()
        job.cancel.set()
        for t in publisher:
            t.join()


def _write(job: _Job, rank: int) -> None:
    """The writer thread: every file of the snapshot, then this rank's marker."""
    try:
        if job.error is None:
            dirs = {path.parent for path, _ in job.files}
            for i, (path, parts) in enumerate(job.files):
                write_file(path, parts)
                job.files[i] = None  # that part of the snapshot is on disk: free its memory
            for d in sorted(dirs):
                ckpt._fsync_dir(d)
            ckpt._fault_point("save", job.step, rank)
            write_file(job.tmp / f"{WRITTEN}{rank:05d}", [])
    except Exception as e:  # any: a writer that died silently would leave rank 0 waiting for its marker
        job.error = e
    finally:
        job.files.clear()


def _publish(job: _Job, world: int, hf_config: dict, state: dict, keep: int) -> None:
    """Rank 0's publisher thread: once every rank's marker is there, what a synchronous save does
    after its barrier. Cancelled (job.cancel) it looks once more, and publishes only if all are."""
    marks = {f"{WRITTEN}{r:05d}" for r in range(world)}
    while not marks <= (seen := _names(job.tmp)):
        if job.cancel.is_set():
            return
        if job.agreed_at is not None and time.monotonic() - job.agreed_at > MARK_GRACE_S:
            job.publish_error = RuntimeError(
                f"rank 0 does not see {min(marks - seen)} in {job.tmp} {MARK_GRACE_S:.0f} s after that rank wrote "
                f"its files; checkpoint.async needs a checkpoint dir that every rank shares")
            return
        job.cancel.wait(_POLL_S)
    try:
        for m in marks:
            (job.tmp / m).unlink()
        job.publish_error = ckpt.finish_files(job.tmp, hf_config, state)
        if job.publish_error is None:
            ckpt.publish(job.root, ckpt.tag_for(job.step), keep)
    except Exception as e:  # anything: wait() must learn of it, not a dead thread's traceback
        job.publish_error = e


def _names(path: Path) -> set:
    try:
        return set(os.listdir(path))
    except FileNotFoundError:
        return set()

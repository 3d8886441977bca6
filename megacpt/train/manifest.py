"""Checkpoint manifests: every file of a checkpoint with its size and BLAKE2b checksum, and
`megacpt verify`.

checkpoint.save writes `manifest.json` last, after every rank's files are on disk and before the
rename that publishes the checkpoint; make_universal gives the `universal/` folder it adds later a
manifest of its own. Readers check a checkpoint against it before loading anything (resume,
rollback, init_from, export, eval): a damaged or truncated file is named instead of surfacing as
an unpickling error, a wrong tensor or a silently different run. Resume falls back to the newest
intact checkpoint (checkpoint.newest_intact). Checkpoints written before manifests existed load
with a warning.

A manifest is a checksum, not a signature: whoever can rewrite a file can rewrite the manifest.
The pickle allowlist (safe_load.py) is what stops planted code.

No torch here: `megacpt verify` stays quick to start.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from megacpt.errors import UserError

MANIFEST = "manifest.json"
STATE_FILE = "megacpt_state.json"  # what marks a directory as a checkpoint (checkpoint.py)
UNIVERSAL = "universal"  # added to a published checkpoint later, with its own manifest
_CHUNK = 8 << 20
# hashlib releases the GIL while hashing large buffers: files are hashed on several threads.
_THREADS = max(1, min(8, os.cpu_count() or 1))


class CheckpointDamaged(UserError):
    pass


def file_digest(path: Path) -> str:
    """BLAKE2b (32-byte digest) of a file's bytes, read in chunks (checkpoint files are GBs)."""
    h = hashlib.blake2b(digest_size=32)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _listed(ckpt_dir: Path) -> list[str]:
    """The files a manifest covers: all below ckpt_dir but the manifest itself, the universal
    folder (and its temporary name) and temporary files of atomic writes."""
    out = []
    for p in ckpt_dir.rglob("*"):
        rel = p.relative_to(ckpt_dir)
        top = rel.parts[0]
        if top in (MANIFEST, UNIVERSAL) or top.startswith(f".{UNIVERSAL}.tmp-") or ".tmp-" in p.name:
            continue
        if p.is_file():
            out.append(rel.as_posix())
    return sorted(out)


def write(ckpt_dir) -> dict:
    """Hash every file of ckpt_dir and write ckpt_dir/manifest.json (to a temporary name, fsynced,
    then renamed: a manifest is whole or absent)."""
    ckpt_dir = Path(ckpt_dir)
    names = _listed(ckpt_dir)
    with ThreadPoolExecutor(_THREADS) as pool:
        digests = list(pool.map(lambda n: file_digest(ckpt_dir / n), names))
    files = {n: {"bytes": (ckpt_dir / n).stat().st_size, "blake2b": d} for n, d in zip(names, digests)}
    manifest = {"format": 1, "hash": "blake2b-256", "files": files}
    tmp = ckpt_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / MANIFEST)
    return manifest


@dataclass
class Verdict:
    path: Path
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problem: str | None = None  # damaged: what, naming the file (relative to path)
    unverified: bool = False  # no manifest (written before checkpoints had one)

    @property
    def intact(self) -> bool:
        return self.problem is None and not self.unverified


def check(ckpt_dir) -> Verdict:
    """Compare ckpt_dir with its manifest: every listed file present, of its size, with its checksum.
    Sizes first (a truncated file is found without reading anything), then the checksums."""
    ckpt_dir = Path(ckpt_dir)
    t0 = time.perf_counter()
    v = Verdict(ckpt_dir)
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        v.unverified = True
        return v
    try:
        files = json.loads(path.read_text())["files"]
        listed = {str(n): (int(e["bytes"]), str(e["blake2b"])) for n, e in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        v.problem = f"{MANIFEST} is unreadable ({type(e).__name__}); the checkpoint cannot be verified"
        return v
    v.files, v.bytes = len(listed), sum(size for size, _ in listed.values())
    v.problem = _size_problem(ckpt_dir, listed)
    if v.problem is None:
        names = sorted(listed)
        with ThreadPoolExecutor(_THREADS) as pool:
            digests = list(pool.map(lambda n: file_digest(ckpt_dir / n), names))
        bad = [n for n, d in zip(names, digests) if d != listed[n][1]]
        if bad:
            more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
            v.problem = f"{bad[0]} does not match its BLAKE2b checksum: changed since it was written{more}"
    v.seconds = time.perf_counter() - t0
    return v


def _size_problem(ckpt_dir: Path, listed: dict) -> str | None:
    for name in sorted(listed):
        want = listed[name][0]
        try:
            size = (ckpt_dir / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if size != want:
            how = "truncated" if size < want else "grown"
            return f"{name} has {size} bytes, the manifest says {want} ({how})"
    return None


def require_intact(ckpt_dir) -> None:
    """Raise CheckpointDamaged naming the file when ckpt_dir does not match its manifest; warn
    (once, on rank 0) when it has none."""
    v = check(ckpt_dir)
    if v.problem is not None:
        raise CheckpointDamaged(f"checkpoint {ckpt_dir} is damaged: {v.problem}; use another checkpoint "
                                f"(`megacpt verify` on the run lists them)")
    if v.unverified and os.environ.get("RANK", "0") == "0":
        print(f"warning: {unverified_note(ckpt_dir)}", file=sys.stderr, flush=True)


def unverified_note(ckpt_dir) -> str:
    return f"{ckpt_dir} has no {MANIFEST} (written before checkpoints had one): loading it unverified"


def checkpoints_in(path) -> list[Path]:
    """A checkpoint dir → [it]; a run dir or its checkpoints/ dir → its checkpoints, oldest first."""
    p = Path(path)
    if (p / STATE_FILE).is_file() or (p / MANIFEST).is_file():
        return [p]
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    return sorted(c for c in root.glob("step_*") if c.is_dir() and (c / STATE_FILE).is_file())


def describe(v: Verdict, name: str) -> str:
    if v.problem is not None:
        return f"DAMAGED     {name}: {v.problem}"
    if v.unverified:
        return f"unverified  {name}: no {MANIFEST} (written before checkpoints had one)"
    return f"intact      {name}: {v.files} files, {v.bytes / 2**20:.1f} MiB checked in {v.seconds:.2f} s"


def run(args) -> int:
    """`megacpt verify RUN_OR_CHECKPOINT` (parser: megacpt/cli/verify.py): one line per checkpoint
    (and per universal/ folder); exit 2 when any is damaged."""
    if not Path(args.path).exists():
        raise UserError(f"{args.path} does not exist; pass a run dir, its checkpoints/ dir or a checkpoint dir")
    found = checkpoints_in(args.path)
    if not found:
        raise UserError(f"{args.path} holds no checkpoint; pass a run dir, its checkpoints/ dir or a checkpoint dir")
    damaged = []
    for c in found:
        for d in [c] + ([c / UNIVERSAL] if (c / UNIVERSAL).is_dir() else []):
            v = check(d)
            name = d.name if d == c else f"{c.name}/{UNIVERSAL}"
            print(describe(v, name), flush=True)
            if v.problem is not None:
                damaged.append(name)
    if damaged:
        raise CheckpointDamaged(f"{len(damaged)} damaged: {', '.join(damaged)} (files named above); a resume "
                                f"falls back to the newest intact checkpoint")
    return 0

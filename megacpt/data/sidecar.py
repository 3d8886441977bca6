"""The shard sidecar PREFIX.json: what `megacpt prepare` and `megacpt merge` record next to the
.bin/.idx shards (tokenizer identity and vocabulary hash, dtype, BOS/EOS, counts, sources), and
what the trainer reads back to check that a corpus fits the model's vocabulary.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from megacpt import __version__, atomic
from megacpt.data.indexed import list_shard_prefixes
from megacpt.errors import DataError

SIDECAR_FORMAT = "megacpt-tokenized"
SIDECAR_VERSION = 1


def sidecar_path(prefix) -> str:
    return f"{prefix}.json"


def created_by() -> str:
    return f"megacpt {__version__}"


def write_sidecar(prefix, sidecar: dict) -> None:
    """Write PREFIX.json atomically: a reader sees the old sidecar or the new one, never a part."""
    path = sidecar_path(prefix)
    atomic.write_json(path, sidecar)


def read_sidecar(prefix) -> dict | None:
    """The sidecar describing a prepared prefix (also found from PREFIX_00000 or PREFIX_valid,
    or from a directory of shards through its first shard); None when there is none."""
    p = str(prefix)
    candidates = [p]
    if Path(p).is_dir():
        try:
            candidates = list_shard_prefixes(p)[:1]
        except DataError:
            return None
    for c in list(candidates):
        m = re.fullmatch(r"(.*)_(\d{5,}|valid)", c)
        if m:
            candidates.append(m.group(1))
    for c in candidates:
        sp = sidecar_path(c)
        if os.path.isfile(sp):
            try:
                with open(sp) as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                raise DataError(f"{sp}: unreadable sidecar ({e}); delete it or re-run megacpt prepare") from None
            if isinstance(data, dict) and data.get("format") == SIDECAR_FORMAT:
                return data
    return None

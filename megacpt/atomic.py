"""Files written whole or not at all: a temporary name in the same folder, then os.replace, so a
reader (or a crash) never sees part of a file and an existing file is only ever replaced whole."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path, data, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent) + "\n")

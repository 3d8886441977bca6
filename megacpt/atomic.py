"""Files written whole or not at all: a temporary name in the same folder, then os.replace, so a
reader (or a crash) never sees part of a file and an existing file is only ever replaced whole."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def write_file(path, write) -> None:
    """write(tmp) fills a temporary file next to `path`, which then replaces `path` whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text: str) -> None:
    write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path, data, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent) + "\n")


def write_dir(out: Path, fill) -> None:
    """Fill a temporary directory next to `out` (fill(tmp)), then put it in place of `out`: a reader sees
    the old directory or the new one, never a half-written one."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        umask = os.umask(0)  # safetensors writes 0600 files; an export is meant to be shared
        os.umask(umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

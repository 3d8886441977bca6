"""A small real labelled set for classification: Debian package descriptions → their section.

    apt-get update                                   # once, as root
    python scripts/debian_sections.py [OUT_DIR]      # default configs/data/debian_sections

Reads `apt-cache dumpavail` (the archive's Packages index, the same on every machine with the
same apt sources — unlike /var/lib/dpkg/status, which lists what one machine has installed),
keeps binary packages of six sections whose one-line description says what the package is for
(games, sound, graphics, science, net, admin), and writes `{text, label}` JSON Lines:

    train_small.jsonl   8 per section      train_large.jsonl   64 per section (⊃ train_small)
    valid.jsonl        40 per section      PROVENANCE.json     source, counts, seed

The text is the short description only (the package name would give many labels away: python3-*,
lib*-dev). Identical descriptions are kept once, and the split is by Debian *source* package, so
"foo" and "foo-data" never land on both sides of it. Deterministic for one Packages index and seed.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

SECTIONS = ["admin", "games", "graphics", "net", "science", "sound"]
N_SMALL, N_LARGE, N_VALID = 8, 64, 40
SEED = 20261206
ROOT = Path(__file__).resolve().parents[1]


def stanzas(text: str):
    for block in text.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Package"):
            yield fields


def by_section(text: str) -> dict[str, dict[str, str]]:
    """section → {source package → its first description}, one description per text."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    seen: set[str] = set()
    for f in stanzas(text):
        section = f.get("Section", "").split("/")[-1]  # contrib/games → games
        desc = f.get("Description", "")
        if section not in SECTIONS or not desc or desc.lower() in seen:
            continue
        seen.add(desc.lower())
        source = f.get("Source", f["Package"]).split()[0]  # "foo (1.2)" → foo
        out[section].setdefault(source, desc)
    return out


def split(groups: dict[str, dict[str, str]]) -> dict[str, list[dict]]:
    rnd = random.Random(SEED)
    rows: dict[str, list[dict]] = {"train_small": [], "train_large": [], "valid": []}
    for section in SECTIONS:
        sources = sorted(groups[section])
        if len(sources) < N_LARGE + N_VALID:
            sys.exit(f"section {section} has {len(sources)} source packages, fewer than {N_LARGE + N_VALID}; "
                     f"run apt-get update for the full Debian index")
        rnd.shuffle(sources)
        pick = [{"text": groups[section][s], "label": section} for s in sources[:N_LARGE + N_VALID]]
        rows["valid"] += pick[:N_VALID]
        rows["train_large"] += pick[N_VALID:]
        rows["train_small"] += pick[N_VALID:N_VALID + N_SMALL]
    for name in rows:
        rnd.shuffle(rows[name])
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else ROOT / "configs" / "data" / "debian_sections"
    index = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True, text=True).stdout
    version = subprocess.run(["apt-cache", "policy", "base-files"], capture_output=True, text=True).stdout
    rows = split(by_section(index))
    out.mkdir(parents=True, exist_ok=True)
    for name, items in rows.items():
        tmp = out / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in items))
        tmp.replace(out / f"{name}.jsonl")
    origin = next((ln.strip() for ln in version.splitlines() if "http" in ln), "apt sources")
    prov = {"source": "apt-cache dumpavail (Debian Packages index), short descriptions",
            "apt_origin": origin, "sections": SECTIONS, "seed": SEED,
            "counts": {k: len(v) for k, v in rows.items()},
            "split": "by source package; identical descriptions kept once"}
    (out / "PROVENANCE.json").write_text(json.dumps(prov, indent=1) + "\n")
    print(json.dumps(prov["counts"]), "→", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

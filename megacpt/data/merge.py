"""`megacpt merge`: concatenate tokenized shards into one, without re-tokenizing.

The .bin files are streamed byte for byte and the sizes concatenated, so N parts of a
`prepare --num-shards N` run merge into exactly the bytes of one unsplit run. Memory is bounded
by the merged sizes array (4 bytes per document), never by the tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

from megacpt.data.indexed import IndexedDataset, IndexedDatasetWriter, list_shard_prefixes
from megacpt.data.sidecar import SIDECAR_FORMAT, SIDECAR_VERSION, created_by, read_sidecar, write_sidecar
from megacpt.errors import DataError, UserError


def _expand(inputs) -> list[str]:
    """Each input: a prefix, a directory of shards, or a prefix split into PREFIX_00000..."""
    prefixes: list[str] = []
    for raw in inputs:
        try:
            prefixes.extend(list_shard_prefixes(raw))
        except DataError:
            raise DataError(f"merge input {raw}: no {raw}.idx/.bin (nor {raw}_00000...); check the prefix") from None
    return prefixes


def _merge_sidecars(prefixes, sidecars, ds_list, output) -> dict:
    known = [(p, s) for p, s in zip(prefixes, sidecars) if s is not None]
    tokenizer = None
    bos = eos = None
    if known:
        first_p, first = known[0]
        for p, s in known[1:]:
            if s["tokenizer"].get("vocab_hash") != first["tokenizer"].get("vocab_hash"):
                raise DataError(
                    f"{p} was tokenized with {s['tokenizer'].get('name_or_path')}, {first_p} with "
                    f"{first['tokenizer'].get('name_or_path')} (different vocabularies); merge shards of one tokenizer"
                )
            if (s.get("bos"), s.get("eos")) != (first.get("bos"), first.get("eos")):
                raise DataError(f"{p} and {first_p} differ in BOS/EOS settings; re-prepare them alike before merging")
        tokenizer, bos, eos = first["tokenizer"], first.get("bos"), first.get("eos")
    sources: list = []
    seen = set()
    skipped = {"empty": 0, "undecodable": 0}
    for _, s in known:
        for src in s.get("sources", []):
            key = (src.get("path"), src.get("records"))
            if key not in seen:  # a prefix and its _valid part share one sidecar
                seen.add(key)
                sources.append(src)
        for k in skipped:
            skipped[k] += s.get("skipped", {}).get(k, 0)
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "tokenizer": tokenizer,
        "vocab_size": tokenizer.get("vocab_size") if tokenizer else None,
        "eos_id": tokenizer.get("eos_id") if tokenizer else None,
        "bos_id": tokenizer.get("bos_id") if tokenizer else None,
        "dtype": ds_list[0].dtype.name,
        "bos": bos,
        "eos": eos,
        "documents": sum(len(d) for d in ds_list),
        "tokens": sum(int(d.num_tokens) for d in ds_list),
        "shards": [{"prefix": Path(output).name, "documents": sum(len(d) for d in ds_list),
                    "tokens": sum(int(d.num_tokens) for d in ds_list)}],
        "valid": None,
        "skipped": skipped,
        "sources": sources,
        "merged_from": list(prefixes),
        "created_by": created_by(),
    }


def merge(inputs, output) -> dict:
    """Concatenate the shards of `inputs` (in order) into OUTPUT.bin/.idx + OUTPUT.json."""
    output = str(output)
    if not inputs:
        raise UserError("merge needs at least one input prefix")
    prefixes = _expand(inputs)
    out_abs = os.path.abspath(output)
    if any(os.path.abspath(p) == out_abs for p in prefixes):
        raise UserError(f"--output {output} is also an input; choose another output prefix")
    ds_list = [IndexedDataset(p) for p in prefixes]  # validates every input before writing
    for p, d in zip(prefixes, ds_list):
        if d.has_modes:
            raise DataError(f"{p}.idx is a multimodal index (has modes); merge supports token shards only")
        if d.dtype != ds_list[0].dtype:
            raise DataError(
                f"{p} holds {d.dtype} tokens but {prefixes[0]} holds {ds_list[0].dtype}; "
                f"merge shards of one tokenizer (same dtype) only"
            )
    sidecars = [read_sidecar(p) for p in prefixes]
    sidecar = _merge_sidecars(prefixes, sidecars, ds_list, output)

    writer = IndexedDatasetWriter(output, ds_list[0].dtype)
    renamed = False
    try:
        for d in ds_list:
            writer.append_dataset(d)
        writer.close()
        writer.commit()
        renamed = True
        write_sidecar(output, sidecar)
    except BaseException:
        writer.abort()
        if renamed:  # keep "all or nothing" even when only the sidecar failed
            for suffix in (".bin", ".idx"):
                Path(output + suffix).unlink(missing_ok=True)
        raise
    return sidecar


def main_args(args) -> int:
    """`megacpt merge` with parsed arguments (parser: megacpt/cli/prepare.py)."""
    sc = merge(args.prefixes, args.output)
    print(f"wrote {args.output}: {sc['documents']:,} documents, {sc['tokens']:,} tokens ({sc['dtype']}) "
          f"from {len(sc['merged_from'])} shards")
    return 0

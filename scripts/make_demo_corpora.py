"""Write the demo's corpora from text already on every machine (nothing is downloaded).

    python scripts/make_demo_corpora.py OUT_DIR

- de.jsonl, the new domain, German: the translated messages of the gettext catalogs under
  /usr/share/locale/de/LC_MESSAGES (one document per 25 messages, in catalog order);
- en.jsonl, the original domain as replayed in training, English: Python's documentation topics
  (`pydoc_data.topics`), one document each;
- en_heldout.jsonl, the original domain as evaluated, English text disjoint from en.jsonl:
  Debian's English manual pages (/usr/share/man/man7, man5, man8, man1 in that order, files
  sorted), troff markup stripped to prose paragraphs, one document per page. Only for validation
  and probes; never trained on. Not python3.x-doc, which is the same text as pydoc's topics.
All as JSON Lines with a "text" field, the input `megacpt prepare` reads. Deterministic (files in
sorted order, fixed caps): a rerun on the same machine writes the same bytes.
"""

import gettext
import gzip
import json
import re
import sys
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")
# man7 (overviews, conventions) holds the most prose; option lists in man1 the least.
MAN_SECTIONS = ("man7", "man5", "man8", "man1")
PAGE_CHARS = 6000  # per page, so that a few long pages (bash, postgres) do not make the set
HELDOUT_CHARS = 900_000  # ~200k SmolLM2 tokens: far above the 8k validation tokens needed
MIN_PARAGRAPH_WORDS = 8
MIN_PAGE_CHARS = 400


def german_documents(per_doc: int = 25):
    msgs = []
    for mo in sorted(Path("/usr/share/locale/de/LC_MESSAGES").glob("*.mo")):
        try:
            with open(mo, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog
        except (OSError, UnicodeDecodeError, gettext.error if hasattr(gettext, "error") else OSError):
            continue
        for key, text in catalog.items():
            if key and isinstance(text, str) and len(text.strip()) > 20:
                msgs.append(" ".join(text.split()))
    for i in range(0, len(msgs), per_doc):
        yield "\n".join(msgs[i : i + per_doc])


def english_documents():
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


# --- manual pages: troff (man macros) to prose

_NAMED = {
    "em": "—", "en": "–", "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'",
    "Aq": "'", "bu": "•", "co": "©", "rg": "®", "tm": "™", "mu": "×", "hy": "-", "ga": "`",
    "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "pl": "+", "eq": "=", "<=": "≤", ">=": "≥",
    "de": "°", "R": "®", "Tm": "™",
}
_ESCAPE = re.compile(
    r"""\\(?:
      [fF](?:\[[^\]]*\]|\(..|.)            # font change
    | s(?:[+-]?\d|\[[^\]]*\]|[+-]?\(\d\d)  # size change
    | n[+-]?(?:\[[^\]]*\]|\(..|.)          # number register
    | [hvwlLbxoNDXZkARz]'[^']*'            # escapes with a quoted argument
    | \*(?P<str>\[[^\]]*\]|\(..|.)         # string
    | \((?P<ch>..)                         # special character \(xx
    | \[(?P<br>[^\]]*)\]                   # special character \[name]
    | (?P<any>.)
    )""",
    re.VERBOSE,
)
_SIMPLE = {"e": "\\", "-": "-", " ": " ", "~": " ", "0": " ", ".": ".", "'": "'", "`": "`", "\\": "\\"}
_BREAKS = {"SH", "SS", "PP", "P", "LP", "sp", "br", "TP", "TQ", "IP", "HP", "RS", "RE", "in", "ti",
           "bp", "ne", "PD", "UR", "UE", "MT", "ME", "SY", "YS", "OP", "nh", "ad"}
_FONT = {"B", "I", "SM", "SB"}  # arguments joined with spaces
_ALTERNATING = {"BR", "IR", "BI", "RB", "RI", "IB"}  # arguments joined without spaces
_SKIP_TO = {"de": "..", "de1": "..", "am": "..", "ig": "..", "TS": ".TE", "EQ": ".EN"}
_ARG = re.compile(r'"((?:[^"]|"")*)"?|(\S+)')


def _unescape_one(m: re.Match) -> str:
    if m.group("str") is not None or m.group("ch") is not None or m.group("br") is not None:
        name = (m.group("str") or m.group("ch") or m.group("br") or "").strip("[]()")
        return _NAMED.get(name.lstrip("("), "")
    if m.group("any") is not None:
        return _SIMPLE.get(m.group("any"), "")
    return ""


def unescape(text: str) -> str:
    text = re.split(r'\\"', text, maxsplit=1)[0]  # \" starts a comment
    return _ESCAPE.sub(_unescape_one, text)


def _macro_text(request: str, rest: str) -> str:
    args = [(m.group(1) if m.group(1) is not None else m.group(2)).replace('""', '"') for m in _ARG.finditer(rest)]
    return ("" if request in _ALTERNATING else " ").join(args)


def man_paragraphs(source: str) -> list[str]:
    """The prose paragraphs of a man(7) page: running text between paragraph macros; headings,
    tags (.TP, .IP), no-fill blocks (.nf/.EX: synopses, code), tables and macro definitions
    left out."""
    paragraphs, cur = [], []
    skip_to, nofill, tag_next = None, False, False

    def flush():
        text = " ".join(" ".join(cur).split())
        cur.clear()
        if text:
            paragraphs.append(text)

    for line in source.splitlines():
        if skip_to is not None:
            skip_to = None if line.startswith(skip_to) else skip_to
            continue
        if line.startswith((".", "'")):
            request, _, rest = line[1:].strip().partition(" ")
            if request in _SKIP_TO:
                skip_to = _SKIP_TO[request]
            elif request in ("nf", "EX", "fi", "EE"):
                flush()
                nofill = request in ("nf", "EX")
            elif request in _BREAKS:
                flush()
                tag_next = request in ("TP", "TQ") or (request in ("SH", "SS") and not rest.strip())
            if request not in _FONT and request not in _ALTERNATING:
                continue
            line = _macro_text(request, rest)
        if nofill:
            continue
        if tag_next:
            tag_next = False
            continue
        cur.append(unescape(line))
    flush()
    return paragraphs


def is_prose(paragraph: str) -> bool:
    words = paragraph.split()
    wordy = sum(1 for w in words if re.fullmatch(r"[(\"']?[A-Za-z][a-z]*[,.;:!?)\"']*", w))
    return (
        len(words) >= MIN_PARAGRAPH_WORDS
        and wordy >= 0.7 * len(words)
        and bool(re.search(r"[.!?][\"')]*$", paragraph))
    )


def man_page_text(path: Path, seen: set) -> str | None:
    """A page's prose, at most PAGE_CHARS (whole paragraphs), without paragraphs that an earlier
    page had (boilerplate such as OpenSSL's licence notice would otherwise recur in every page);
    None for redirects, mdoc pages, pages that are not UTF-8 and pages with too little prose."""
    try:
        source = gzip.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError):
        return None
    head = source[:4000]
    if re.search(r"^\.(so|Dd|Sh) ", head, re.MULTILINE):  # a redirect, or mdoc (BSD) macros
        return None
    kept, size = [], 0
    for p in man_paragraphs(source):
        if not is_prose(p) or p in seen:
            continue
        if size + len(p) > PAGE_CHARS:
            break
        kept.append(p)
        seen.add(p)
        size += len(p) + 1
    text = "\n".join(kept)
    return text if len(text) >= MIN_PAGE_CHARS else None


def man_pages():
    """English pages only: /usr/share/man/manN holds English, translations sit in
    /usr/share/man/LANG/manN. Symlinks (aliases of another page) and Python's pages are skipped."""
    for section in MAN_SECTIONS:
        for path in sorted((MAN_ROOT / section).glob("*.gz")):
            if path.is_symlink() or path.name.lower().startswith(("python", "pydoc")):
                continue
            yield path


def heldout_documents(limit: int = HELDOUT_CHARS):
    total, seen = 0, set()
    for path in man_pages():
        text = man_page_text(path, seen)
        if text is None:
            continue
        yield text
        total += len(text)
        if total >= limit:
            return


def write_corpus(path: Path, docs) -> None:
    n = 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for text in docs:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            n += 1
    if n == 0:
        tmp.unlink()
        sys.exit(f"error: no documents for {path.name} found on this machine")
    tmp.rename(path)
    print(f"{path}: {n} documents")


def main(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in (("de", german_documents), ("en", english_documents), ("en_heldout", heldout_documents)):
        write_corpus(out / f"{name}.jsonl", docs())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "work/corpus")

"""Write the demo's two corpora from text already on every machine (nothing is downloaded).

    python scripts/make_demo_corpora.py OUT_DIR

- new domain, German: the translated messages of the gettext catalogs under
  /usr/share/locale/de/LC_MESSAGES (one document per 25 messages, in catalog order);
- original domain, English: Python's documentation topics (`pydoc_data.topics`), one document each.
Both as JSON Lines with a "text" field, the input `megacpt prepare` reads.
"""

import gettext
import json
import sys
from pathlib import Path


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


def main(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in (("de", german_documents()), ("en", english_documents())):
        n = 0
        with open(out / f"{name}.jsonl", "w") as f:
            for text in docs:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                n += 1
        if n == 0:
            sys.exit(f"error: no {name} documents found on this machine")
        print(f"{out / (name + '.jsonl')}: {n} documents")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "work/corpus")

"""scripts/make_demo_corpora.py: manual pages (troff) to prose, the demo's held-out English."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import make_demo_corpora as corpora  # noqa: E402 (a script, not a package)

PAGE = r""".\" Copyright notice: a comment, never text
.TH DEMO 7 2024-01-01 "Demo pages"
.SH NAME
demo \- a page that shows the macros
.SH SYNOPSIS
.nf
.B demo [\-v] file
.fi
.SH DESCRIPTION
The
.B demo
program reads a
.IR file ,
prints it and exits\(emquickly.
See
.BR cat (1)
for the \fBreal\fR thing\&.
.PP
.TP
\fB\-v\fR
Print every line twice so that the reader sees what happens here.
.EX
for x in a b; do echo "$x"; done
.EE
Short one.
.SH "SEE ALSO"
.BR cat (1)
"""


def test_man_page_to_paragraphs():
    assert corpora.man_paragraphs(PAGE) == [
        "demo - a page that shows the macros",
        "The demo program reads a file, prints it and exits—quickly. See cat(1) for the real thing.",
        "Print every line twice so that the reader sees what happens here.",
        "Short one.",
        "cat(1)",
    ]


def test_page_text_keeps_prose_once(tmp_path, monkeypatch):
    page = tmp_path / "demo.7.gz"
    page.write_bytes(gzip.compress(PAGE.encode()))
    monkeypatch.setattr(corpora, "MIN_PAGE_CHARS", 50)
    seen = set()
    text = corpora.man_page_text(page, seen)
    # The same paragraphs in a later page are boilerplate by then: nothing new is left.
    again = corpora.man_page_text(page, seen)
    assert text == (
        "The demo program reads a file, prints it and exits—quickly. See cat(1) for the real thing.\n"
        "Print every line twice so that the reader sees what happens here."
    )
    assert again is None

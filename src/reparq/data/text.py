"""Real English text from the Debian package ``git-doc`` (Git's manual, HTML), deterministic.

Why this package: it ships about 450k words of English prose (Git's user manual, tutorials,
how-tos and every command's manual page) as HTML in ``/usr/share/doc/git-doc``, a 2 MB
download from Debian main. The smaller Debian Reference has only ~45k words of prose
(most of it is tables), too little to train even a few-million-parameter language model
without memorizing it.

What we read: the text of every ``<p>`` element of every HTML file, files in sorted path
order, outside tables and code listings (``<pre>``); tags are dropped, entities decoded,
whitespace collapsed, repeated paragraphs (page footers such as "Part of the git(1) suite")
kept once. That leaves prose; inline command names stay as words. From it:

- ``load_sentences``: sentences for the MiniLM embedding benchmark;
- ``split_paragraphs``: a train / held-out split for the LLaMA zoo model (every ``k``-th
  paragraph is held out, so both parts cover every page);
- ``token_stream`` / ``token_windows``: token ids of a split, cut into fixed-length windows.
Nothing here is random: the same package version gives the same data (``corpus_version``).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable

import torch

from reparq.errors import ReparqError

PACKAGE = "git-doc"
TEXT_DIR = Path(os.environ.get("REPARQ_TEXT_DIR", "/usr/share/doc/git-doc"))
INSTALL_HINT = "install it with: sudo apt-get install git-doc (or set REPARQ_TEXT_DIR)"
HELD_OUT_EVERY = 10  # paragraph i is held out when i % 10 == 9: 10% of the text, spread over the manual

_SKIP_TAGS = {"table", "pre", "script", "style"}
# Abbreviations after which a period does not end a sentence.
_ABBREV = re.compile(r"(?:\b(?:e\.g|i\.e|etc|vs|cf|Dr|Mr|Mrs|Ms|No|Fig|approx|incl)\.|\b[A-Z]\.)$")


class _ParagraphParser(HTMLParser):
    """Collects the text of <p> elements that are not inside a table or a code listing."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._skip = 0
        self._buf: list[str] | None = None

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in _SKIP_TAGS:
            self._skip += 1
        elif tag == "p" and self._skip == 0:
            self._flush()
            self._buf = []

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        elif tag == "p":
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._buf is not None and self._skip == 0:
            self._buf.append(data)

    def _flush(self) -> None:
        if self._buf is not None:
            text = re.sub(r"\s+", " ", "".join(self._buf)).strip()
            if text:
                self.paragraphs.append(text)
        self._buf = None


def html_paragraphs(html: str) -> list[str]:
    """Prose paragraphs of one HTML document, markup stripped, whitespace collapsed."""
    parser = _ParagraphParser()
    parser.feed(html)
    parser.close()
    parser._flush()
    return parser.paragraphs


def html_files(root: str | Path | None = None) -> list[Path]:
    """Every HTML file under ``root``, in sorted relative-path order (the order fixes the data)."""
    root = Path(root) if root is not None else TEXT_DIR
    if not root.is_dir():
        raise ReparqError(f"English text directory {root} not found; {INSTALL_HINT}")
    files = sorted(root.rglob("*.html"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ReparqError(f"no HTML files in {root}; {INSTALL_HINT}")
    return files


def corpus_version(root: str | Path | None = None) -> str:
    """The Debian package version the text came from ('unknown' outside a Debian install)."""
    root = Path(root) if root is not None else TEXT_DIR
    changelog = root / "changelog.Debian.gz"
    if changelog.exists():
        import gzip

        with gzip.open(changelog, "rt", errors="replace") as fh:
            m = re.match(r"\S+ \(([^)]+)\)", fh.readline())
        if m:
            return m.group(1)
    return "unknown"


@lru_cache(maxsize=4)
def _paragraphs_cached(root: str) -> tuple[str, ...]:
    out: dict[str, None] = {}  # ordered set: repeated page footers are kept once
    for path in html_files(root):
        for p in html_paragraphs(path.read_text(encoding="utf-8", errors="replace")):
            out.setdefault(p)
    return tuple(out)


def load_paragraphs(root: str | Path | None = None, min_words: int = 4) -> list[str]:
    """Every distinct prose paragraph, in file order (paragraphs under ``min_words`` words dropped)."""
    paragraphs = _paragraphs_cached(str(Path(root) if root is not None else TEXT_DIR))
    return [p for p in paragraphs if len(p.split()) >= min_words]


def split_sentences(paragraph: str) -> list[str]:
    """Split at '.', '!' or '?' followed by a space and an upper-case letter, quote or bracket,
    except after common abbreviations (e.g., i.e., etc., initials)."""
    pieces = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(\[])", paragraph)
    sentences: list[str] = []
    for piece in pieces:
        if sentences and _ABBREV.search(sentences[-1]):
            sentences[-1] = f"{sentences[-1]} {piece}"
        else:
            sentences.append(piece)
    return [s.strip() for s in sentences if s.strip()]


def load_sentences(root: str | Path | None = None, min_words: int = 6, max_words: int = 40,
                   limit: int | None = None) -> list[str]:
    """Distinct sentences of ``min_words``..``max_words`` words that end like a sentence, in book order."""
    seen: set[str] = set()
    out: list[str] = []
    for paragraph in load_paragraphs(root):
        for s in split_sentences(paragraph):
            n = len(s.split())
            if min_words <= n <= max_words and s[-1] in ".!?" and s[0].isalpha() and s not in seen:
                seen.add(s)
                out.append(s)
                if limit is not None and len(out) >= limit:
                    return out
    return out


def split_paragraphs(paragraphs: list[str], held_out_every: int = HELD_OUT_EVERY) -> tuple[list[str], list[str]]:
    """(train, held_out): paragraph ``i`` is held out when ``i % held_out_every == held_out_every - 1``."""
    if held_out_every < 2:
        raise ReparqError(f"held_out_every must be at least 2, got {held_out_every}")
    train = [p for i, p in enumerate(paragraphs) if i % held_out_every != held_out_every - 1]
    held = [p for i, p in enumerate(paragraphs) if i % held_out_every == held_out_every - 1]
    return train, held


def token_stream(paragraphs: list[str], encode: Callable[[str], list[int]], sep_id: int) -> torch.Tensor:
    """All paragraphs encoded and joined, each followed by ``sep_id`` (int64, 1-D)."""
    ids: list[int] = []
    for p in paragraphs:
        ids += encode(p)
        ids.append(sep_id)
    return torch.tensor(ids, dtype=torch.long)


def token_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows [N, seq_len] of a token stream (the incomplete tail is dropped)."""
    n = stream.numel() // seq_len
    if n == 0:
        raise ReparqError(f"text too short for one window of {seq_len} tokens ({stream.numel()} tokens)")
    return stream[: n * seq_len].view(n, seq_len).clone()

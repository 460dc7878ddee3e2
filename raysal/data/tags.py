"""PanCap caption tags → clean caption + character spans with segment ids.

Two syntaxes occur (DESIGN §2.2), sometimes mixed in one caption:
  colon     ``<1,2: two cushions>``   (~96 % of PanCap files)
  no-colon  ``<1,2>two cushions>``    (~4 %)
Upstream disagrees on the id convention, so each syntax has its own offset, added to every parsed id to get the
mask's segment id. Validation against ``segments_info`` happens in `raysal.data.check`, not here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# One regex, two alternatives, scanned left to right so mixed captions keep their order.
# colon form:    <ids: phrase>    — DESIGN's regex `<\s*([\d,\s]+)\s*:\s*([^>]+)>`
# no-colon form: <ids>phrase>     — the phrase runs to the next '>' and holds no '<'
_TAG = re.compile(
    r"<\s*(?P<cids>\d[\d,\s]*?)\s*:\s*(?P<cphrase>[^<>]+?)\s*>"
    r"|<\s*(?P<nids>\d[\d,\s]*?)\s*>\s*(?P<nphrase>[^<>]+?)\s*>"
)


@dataclass(frozen=True)
class Span:
    """A tagged phrase in the clean caption: ``clean[start:end]`` names ``segment_ids``."""

    start: int
    end: int
    segment_ids: tuple[int, ...]
    syntax: str  # "colon" | "nocolon": kept so a report can say which convention an id came from


@dataclass(frozen=True)
class ParsedCaption:
    text: str  # clean caption: tags replaced by their phrases
    spans: tuple[Span, ...]
    malformed: tuple[str, ...]  # leftover '<' / '>' fragments that no tag pattern explained


class TagSyntaxError(ValueError):
    pass


def _ids(raw: str) -> tuple[int, ...]:
    parts = [p for p in re.split(r"[\s,]+", raw.strip()) if p]
    return tuple(int(p) for p in parts)


def parse_caption(raw: str, *, colon_offset: int = 0, nocolon_offset: int = 1) -> ParsedCaption:
    """Parse a tagged caption.

    ``colon_offset`` / ``nocolon_offset`` are added to the ids of each syntax (defaults: colon ids already equal
    the mask value, no-colon ids are 0-based — the public data-quality report; the reference repo uses +1 for both).
    Whitespace inside a tag around the phrase is dropped; text outside tags is kept verbatim, so the spans
    index the clean text exactly.
    """
    pieces: list[str] = []
    spans: list[Span] = []
    pos = 0  # position in raw
    length = 0  # length of the clean text so far
    for m in _TAG.finditer(raw):
        before = raw[pos : m.start()]
        pieces.append(before)
        length += len(before)
        if m.group("cids") is not None:
            ids, phrase, syntax, offset = m.group("cids"), m.group("cphrase"), "colon", colon_offset
        else:
            ids, phrase, syntax, offset = m.group("nids"), m.group("nphrase"), "nocolon", nocolon_offset
        segment_ids = tuple(i + offset for i in _ids(ids))
        pieces.append(phrase)
        spans.append(Span(length, length + len(phrase), segment_ids, syntax))
        length += len(phrase)
        pos = m.end()
    pieces.append(raw[pos:])
    text = "".join(pieces)
    malformed = tuple(frag for frag in re.findall(r"[^\s]*[<>][^\s]*", text))
    return ParsedCaption(text=text, spans=tuple(spans), malformed=malformed)


def format_tag(segment_ids: tuple[int, ...] | list[int], phrase: str, *, syntax: str = "colon") -> str:
    """Inverse of the parser for one tag (ids written as given, no offset applied); used by the generator."""
    ids = ",".join(str(i) for i in segment_ids)
    if syntax == "colon":
        return f"<{ids}: {phrase}>"
    if syntax == "nocolon":
        return f"<{ids}>{phrase}>"
    raise TagSyntaxError(f"unknown tag syntax {syntax!r} (expected 'colon' or 'nocolon')")

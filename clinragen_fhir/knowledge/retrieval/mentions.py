"""Disorder and symptom terms in the notes, longest match first, with a NegEx-style negation
check (`find_mentions`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from clinragen_fhir.encoding.schema import Note
from clinragen_fhir.knowledge.graph import SCT, local
from clinragen_fhir.knowledge.retrieval.results import NoteMention
from clinragen_fhir.knowledge.retrieval.rules import TOKEN, rule_index

if TYPE_CHECKING:
    from clinragen_fhir.knowledge.graph import KnowledgeGraph

_NEG_PRE = re.compile(
    r"\b(no|not|denies|denied|deny|denying|without|negative for|free of|absence of|"
    r"ruled out|rules out|rule out|never had|no evidence of|no history of|no signs? of|"
    r"resolved)\b[^.;:\n]*$", re.IGNORECASE)
_NEG_POST = re.compile(r"^[^.;:\n]{0,30}?\b(was ruled out|ruled out|is unlikely|unlikely|"
                       r"absent|was excluded|excluded|resolved)\b", re.IGNORECASE)
_CLAUSE_BREAK = re.compile(r"[.;:\n]|\bbut\b|\bhowever\b|\balthough\b|\bexcept\b", re.IGNORECASE)
_NEG_WINDOW_WORDS = 6
# NegEx pseudo-triggers: contain a negation word but negate nothing after them
_PSEUDO_NEG = re.compile(r"\b(not in labou?r force|not only|no increase|no change|not necessarily|"
                         r"no further|not certain whether|gram negative|no known allergies)\b",
                         re.IGNORECASE)


def _negated(text: str, start: int, end: int) -> bool:
    """NegEx-style: a negation trigger before the term (same clause, <= 6 words) or after it."""
    head = text[max(0, start - 120):start]
    breaks = list(_CLAUSE_BREAK.finditer(head))
    if breaks:
        head = head[breaks[-1].end():]
    words = _PSEUDO_NEG.sub(" ", head).split()
    window = " ".join(words[-_NEG_WINDOW_WORDS:])
    if _NEG_PRE.search(window):
        return True
    tail = text[end:end + 60]
    return bool(_NEG_POST.match(tail))


def find_mentions(kg: KnowledgeGraph, notes: Sequence[Note]) -> list[NoteMention]:
    """Disorder and symptom terms in the notes (longest match first), with span and negation."""
    index = rule_index(kg)
    out: list[NoteMention] = []
    for note in notes:
        spans = [(m.start(), m.end()) for m in TOKEN.finditer(note.text)]
        words = [note.text[s:e] for s, e in spans]
        lower = [w.lower() for w in words]
        i = 0
        while i < len(words):
            step = 1
            for n in index.first_tokens.get(lower[i], ()):
                if i + n > len(words):
                    continue
                hit = (index.terms.get(tuple(lower[i:i + n]))
                       or index.terms.get(("\0", *words[i:i + n])))
                if hit is None:
                    continue
                start, end = spans[i][0], spans[i + n - 1][1]
                uri, kind = hit
                out.append(NoteMention(uri, local(uri, SCT), kind, note.text[start:end],
                                       _negated(note.text, start, end), note.document_id,
                                       start, end))
                step = n
                break
            i += step
    return out

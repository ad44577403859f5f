"""Label leakage control: a note written before the index time must not name a label disorder.

A label is named by its preferred term or any synonym in the graph, and also by the terms of its
IS-A descendants ("type 2 diabetes" names "diabetes mellitus"). Matching is case-insensitive and
word-bounded, and is deliberately broader than the retrieval's note matcher (which is
case-sensitive for abbreviations), so masking errs towards hiding too much. The masker itself
(a token index: fast, every nested match) is the runtime's, `clinragen_fhir.knowledge.masking`,
so the worker hides from the model exactly what training hid; `leaked_terms` is an independent
regex check for the tests.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace
from functools import lru_cache

from clinragen_fhir.encoding.schema import Note
from clinragen_fhir.knowledge import KnowledgeGraph
from clinragen_fhir.knowledge.masking import ROOTS, every_disorder, mask_text


@dataclass
class MaskResult:
    """Notes after masking, and what was done to them (the counts go into example meta)."""

    notes: list[Note]
    masked_mentions: int = 0  # spans replaced by MASK
    masked_notes: int = 0  # notes with at least one span replaced
    dropped_notes: int = 0  # notes removed (policy "drop")


def label_terms(kg: KnowledgeGraph, labels: Iterable[str]) -> list[str]:
    """Every term that names one of the labels or a descendant of one, longest first."""
    codes: set[str] = set()
    for code in labels:
        if code in ROOTS:
            continue
        codes.add(code)
        codes |= kg.descendants(code)
    terms: set[str] = set()
    for code in codes:
        dis = kg.disorder(code)
        if dis is not None:
            terms.update(t.strip() for t in (dis.term, *dis.synonyms) if len(t.strip()) >= 2)
    return sorted(terms, key=lambda t: (-len(t), t.lower()))


@lru_cache(maxsize=4096)
def _pattern(terms: tuple[str, ...]) -> re.Pattern[str]:
    # whitespace inside a term matches any run of whitespace (notes wrap lines)
    alts = [r"\s+".join(re.escape(w) for w in t.split()) for t in terms]
    return re.compile(r"(?<!\w)(?:" + "|".join(alts) + r")(?!\w)", re.IGNORECASE)


def term_pattern(kg: KnowledgeGraph, labels: Collection[str]) -> re.Pattern[str] | None:
    """The compiled matcher for these labels' terms (None when there is nothing to match)."""
    terms = tuple(label_terms(kg, labels))
    return _pattern(terms) if terms else None


def masked_codes(kg: KnowledgeGraph, labels: Collection[str], known: Collection[str],
                 scope: str = "unknown") -> set[str]:
    """The disorders whose names are hidden from the notes of one example.

    scope "labels": the labels (and, through `label_terms`, their descendants) only; then the
    mere presence of MASK tells a model that *some* label exists, a leak of its own.
    scope "unknown" (default): every disorder of the graph not known at the index time, labels
    or not; what is hidden then depends only on the history before the index time.
    """
    if scope == "labels":
        return set(labels).union(*(kg.descendants(c) for c in labels))
    if scope == "unknown":
        return (set(every_disorder(kg)) - set(known)) | set(labels)
    raise ValueError(f"mask scope must be 'labels' or 'unknown', not {scope!r}")


def mask_notes(kg: KnowledgeGraph, notes: Iterable[Note], codes: Collection[str],
               policy: str = "mask") -> MaskResult:
    """Replace every mention of `codes` (policy "mask") or drop a note naming one ("drop").

    `codes` is whatever must not be named: `masked_codes(...)` in the dataset builder."""
    if policy not in ("mask", "drop"):
        raise ValueError(f"leak policy must be 'mask' or 'drop', not {policy!r}")
    out = MaskResult([])
    for note in notes:
        text, n = mask_text(kg, note.text, codes)
        if n == 0:
            out.notes.append(note)
        elif policy == "drop":
            out.dropped_notes += 1
        else:
            out.masked_mentions += n
            out.masked_notes += 1
            out.notes.append(replace(note, text=text))
    return out


def leaked_terms(kg: KnowledgeGraph, text: str, labels: Collection[str]) -> list[str]:
    """The label terms still present in a text (empty when it is clean); used by the tests."""
    pattern = term_pattern(kg, labels)
    return [m.group(0) for m in pattern.finditer(text)] if pattern is not None else []

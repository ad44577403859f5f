"""Disorder names hidden from the notes the model reads, the same way in training and serving.

A model trained on visit examples never saw a disorder named in a note: every name was replaced
by MASK (`training.data.visit_examples`), because a note naming a label predicts it. The worker
must hand the model the same view, or the head reads words it was never trained on (and a note's
"diabetes" would conclude diabetes). Matching is case-insensitive and token-bounded, over every
term and synonym of every disorder in the graph, nested and overlapping mentions included.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

from clinragen_fhir.encoding.schema import Note
from clinragen_fhir.knowledge.graph import KnowledgeGraph

MASK = "[masked]"
# "Disease", the graph's root: every label implies it, so it is neither a label nor masked
ROOTS = frozenset({"64572001"})


@dataclass(frozen=True)
class _TermIndex:
    terms: dict[tuple[str, ...], frozenset[str]]  # lower-cased token tuple -> disorder codes
    lengths: dict[str, tuple[int, ...]]  # first token -> term lengths, longest first


_TOKEN = re.compile(r"\w+|[^\w\s]")


@lru_cache(maxsize=4)
def _term_index(kg: KnowledgeGraph) -> _TermIndex:
    terms: dict[tuple[str, ...], set[str]] = {}
    for code, dis in kg.disorders().items():
        if code in ROOTS:
            continue
        for t in (dis.term, *dis.synonyms):
            key = tuple(w.lower() for w in _TOKEN.findall(t))
            if len(t.strip()) >= 2 and key:
                terms.setdefault(key, set()).add(code)
    lengths: dict[str, set[int]] = {}
    for key in terms:
        lengths.setdefault(key[0], set()).add(len(key))
    return _TermIndex({k: frozenset(v) for k, v in terms.items()},
                      {k: tuple(sorted(v, reverse=True)) for k, v in lengths.items()})


@lru_cache(maxsize=4)
def every_disorder(kg: KnowledgeGraph) -> frozenset[str]:
    """The codes whose names the model never reads: every disorder of the graph but its root."""
    return frozenset(kg.disorders()) - ROOTS


@lru_cache(maxsize=50_000)
def occurrences(kg: KnowledgeGraph, text: str) -> tuple[tuple[int, int, frozenset[str]], ...]:
    """Every (start, end, codes) where a disorder term occurs, nested and overlapping ones too.

    Computed once per note text: the same note is an input of many examples of one patient."""
    index = _term_index(kg)
    spans = [(m.start(), m.end()) for m in _TOKEN.finditer(text)]
    lower = [text[a:b].lower() for a, b in spans]
    out: list[tuple[int, int, frozenset[str]]] = []
    for i, tok in enumerate(lower):
        for n in index.lengths.get(tok, ()):
            codes = index.terms.get(tuple(lower[i:i + n])) if i + n <= len(lower) else None
            if codes:
                out.append((spans[i][0], spans[i + n - 1][1], codes))
    return tuple(out)


def mask_text(kg: KnowledgeGraph, text: str, codes: Collection[str]) -> tuple[str, int]:
    """The text with every mention of these disorders replaced by MASK; how many spans."""
    wanted = codes if isinstance(codes, (set, frozenset)) else set(codes)
    hits = sorted((a, b) for a, b, cs in occurrences(kg, text) if not cs.isdisjoint(wanted))
    if not hits:
        return text, 0
    merged: list[list[int]] = []
    for a, b in hits:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    parts, pos = [], 0
    for a, b in merged:
        parts += [text[pos:a], MASK]
        pos = b
    parts.append(text[pos:])
    return "".join(parts), len(merged)


def mask_disorder_names(kg: KnowledgeGraph, notes: Sequence[Note]) -> list[Note]:
    """The notes as the model reads them: every disorder name of the graph masked. Idempotent
    (MASK names nothing), so notes a training example already masked pass through unchanged."""
    codes = every_disorder(kg)
    out: list[Note] = []
    for note in notes:
        text, n = mask_text(kg, note.text, codes)
        out.append(replace(note, text=text) if n else note)
    return out

"""The rule index: the graph's finding rules, associations, thresholds and note terms, read by
SPARQL once per graph version and cached (`rule_index`); the tests a disorder's rationale may
cite (`supporting_tests`) and the disorders one reading is evidence for (`supported_by`)."""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from rdflib.namespace import SKOS

from clinragen_fhir.knowledge.graph import LOINC, PREFIXES, SCT, local

if TYPE_CHECKING:
    from clinragen_fhir.knowledge.graph import KnowledgeGraph


@dataclass(frozen=True)
class FindingDef:
    uri: str
    label: str
    observables: tuple[str, ...]
    direction: str
    threshold: float
    upper: float | None
    sex: str | None
    min_count: int
    min_span_days: float
    window_days: float


@dataclass(frozen=True)
class AssocDef:
    uri: str
    finding: str
    disorder: str
    polarity: str
    strength: float
    source: str
    source_label: str


@dataclass
class RuleIndex:
    findings: list[FindingDef]
    assocs_by_finding: dict[str, list[AssocDef]]
    default_threshold: float
    disorder_threshold: dict[str, float]
    note_strength: float
    note_source: str
    note_source_label: str
    terms: dict[tuple[str, ...], tuple[str, str]]  # token tuple -> (uri, kind)
    first_tokens: dict[str, tuple[int, ...]]  # first token -> term lengths to try, longest first
    labels: dict[str, str]


_FINDINGS_Q = """
SELECT ?f ?label ?dir ?thr ?upper ?sex ?minc ?span ?win
       (GROUP_CONCAT(DISTINCT STR(?obs); separator=" ") AS ?observables) WHERE {
  ?f a crg:Finding ; skos:prefLabel ?label ; crg:direction ?dir ; crg:threshold ?thr ;
     crg:observable ?obs .
  OPTIONAL { ?f crg:upperThreshold ?upper } OPTIONAL { ?f crg:sex ?sex }
  OPTIONAL { ?f crg:minCount ?minc } OPTIONAL { ?f crg:minSpanDays ?span }
  OPTIONAL { ?f crg:windowDays ?win }
} GROUP BY ?f ?label ?dir ?thr ?upper ?sex ?minc ?span ?win"""
_ASSOC_Q = """
SELECT ?a ?f ?d ?pol ?str ?src ?srcl WHERE {
  ?a a crg:Association ; crg:finding ?f ; crg:disorder ?d ; crg:polarity ?pol ;
     crg:strength ?str ; crg:source ?src .
  OPTIONAL { ?src rdfs:label ?srcl }
}"""
_CONFIG_Q = """
SELECT ?thr ?ns ?src ?srcl WHERE {
  ?c a crg:RuleConfig ; crg:conclusionThreshold ?thr ; crg:noteMentionStrength ?ns ;
     crg:noteSource ?src . OPTIONAL { ?src rdfs:label ?srcl }
}"""
_TERMS_Q = """
SELECT ?c ?kind ?term WHERE {
  { ?c a crg:Disorder . BIND("disorder" AS ?kind) }
  UNION { ?c a crg:Symptom . BIND("symptom" AS ?kind) }
  { ?c skos:prefLabel ?term } UNION { ?c skos:altLabel ?term }
}"""
_DTHR_Q = "SELECT ?d ?t WHERE { ?d a crg:Disorder ; crg:conclusionThreshold ?t . }"

_GROUPING_MIN_LEN = 4  # terms shorter than this are matched case-sensitively (abbreviations)
_index_cache: dict[str, RuleIndex] = {}
_index_lock = threading.Lock()
_support_cache: dict[tuple[str, str], frozenset[str]] = {}
_by_test_cache: dict[str, dict[str, list[tuple[FindingDef, frozenset[str]]]]] = {}
TRENDS = ("rise", "fold-rise")  # findings on a change between readings, not on one value


def _f(value: object, default: float = 0.0) -> float:
    return float(value.toPython()) if value is not None else default  # type: ignore[attr-defined]


def rule_index(kg: KnowledgeGraph) -> RuleIndex:
    """The finding rules, facts and note terms of this graph version (cached per version)."""
    with _index_lock:
        if kg.version in _index_cache:
            return _index_cache[kg.version]
    g = kg.graph
    findings: list[FindingDef] = []
    labels: dict[str, str] = {}
    for row in g.query(_FINDINGS_Q, initNs=PREFIXES):
        f, label, direction, thr, upper, sex, minc, span, win, obs = row  # type: ignore[misc]
        codes = tuple(sorted(local(o, LOINC) for o in str(obs).split()))
        findings.append(FindingDef(
            str(f), str(label), codes, str(direction), _f(thr),
            _f(upper) if upper is not None else None, str(sex) if sex is not None else None,
            int(_f(minc, 1)), _f(span), _f(win)))
        labels[str(f)] = str(label)
    findings.sort(key=lambda fd: fd.uri)
    assocs: dict[str, list[AssocDef]] = {}
    for row in g.query(_ASSOC_Q, initNs=PREFIXES):
        a, f, d, pol, strength, src, srcl = row  # type: ignore[misc]
        assocs.setdefault(str(f), []).append(AssocDef(
            str(a), str(f), str(d), str(pol), _f(strength), str(src),
            str(srcl) if srcl is not None else str(src)))
    for lst in assocs.values():
        lst.sort(key=lambda x: x.uri)
    default_thr, note_strength, note_src, note_srcl = 0.5, 0.0, "", "clinical note"
    for row in g.query(_CONFIG_Q, initNs=PREFIXES):
        thr, ns, src, srcl = row  # type: ignore[misc]
        default_thr, note_strength = _f(thr), _f(ns)
        note_src, note_srcl = str(src), str(srcl or src)
    dthr = {str(d): _f(t) for d, t in g.query(_DTHR_Q, initNs=PREFIXES)}  # type: ignore[misc]
    terms: dict[tuple[str, ...], tuple[str, str]] = {}
    for row in g.query(_TERMS_Q, initNs=PREFIXES):
        c, kind, term = row  # type: ignore[misc]
        t = str(term).strip()
        if len(t) < 2:
            continue
        key = term_key(t)
        # a term shared by two concepts goes to the smallest id (stable across runs)
        if key not in terms or str(c) < terms[key][0]:
            terms[key] = (str(c), str(kind))
        if str(c) not in labels:
            labels[str(c)] = str(g.value(c, SKOS.prefLabel) or t)
    lengths: dict[str, set[int]] = {}
    for key in terms:
        words = key[1:] if key[0] == "\0" else key
        lengths.setdefault(words[0].lower(), set()).add(len(words))
    first = {tok: tuple(sorted(ns, reverse=True)) for tok, ns in lengths.items()}
    for dis in kg.disorders().values():
        labels[dis.uri] = dis.term
    index = RuleIndex(findings, assocs, default_thr, dthr, note_strength, note_src, note_srcl,
                      terms, first, labels)
    with _index_lock:
        _index_cache[kg.version] = index
    return index


TOKEN = re.compile(r"\w+|[^\w\s]")


def term_key(term: str) -> tuple[str, ...]:
    """Token tuple of a term: lower-cased, except short or all-capital abbreviations (CKD, AF),
    which must match case-sensitively so that e.g. "af" in ordinary text does not."""
    tokens = TOKEN.findall(term)
    if len(term) < _GROUPING_MIN_LEN or term.isupper():
        return ("\0", *tokens)
    return tuple(t.lower() for t in tokens)


def supporting_tests(kg: KnowledgeGraph, code: str) -> frozenset[str]:
    """LOINC codes of the findings that support the disorder or one of its descendants: the
    tests whose readings a rationale may cite for it (the teacher's targets and the runtime's
    grounded decoding both ask this)."""
    key = (kg.version, code)
    if key not in _support_cache:
        index = rule_index(kg)
        related = {code} | kg.descendants(code)
        _support_cache[key] = frozenset(
            loinc for f in index.findings for a in index.assocs_by_finding.get(f.uri, [])
            if a.polarity == "supports" and local(a.disorder, SCT) in related
            for loinc in f.observables)
    return _support_cache[key]


def qualifies(fd: FindingDef, values: np.ndarray) -> np.ndarray:
    """Which values meet a level finding's criterion (all False for a trend finding)."""
    if fd.direction == "high":
        return values >= fd.threshold
    if fd.direction == "above":
        return values > fd.threshold
    if fd.direction == "low":
        return values < fd.threshold
    if fd.direction == "range":
        upper = fd.upper if fd.upper is not None else math.inf
        return (values >= fd.threshold) & (values < upper)
    return np.zeros(len(values), dtype=bool)


def _supporting_by_test(kg: KnowledgeGraph) -> dict[str, list[tuple[FindingDef, frozenset[str]]]]:
    """LOINC -> (finding on it, the disorders it supports with their ancestors), per version."""
    if kg.version not in _by_test_cache:
        index = rule_index(kg)
        out: dict[str, list[tuple[FindingDef, frozenset[str]]]] = {}
        for f in index.findings:
            direct = {local(a.disorder, SCT) for a in index.assocs_by_finding.get(f.uri, [])
                      if a.polarity == "supports"}
            if not direct:
                continue
            codes = frozenset(direct.union(*(kg.ancestors(d) for d in direct)))
            for loinc in f.observables:
                out.setdefault(loinc, []).append((f, codes))
        _by_test_cache[kg.version] = out
    return _by_test_cache[kg.version]


def supported_by(kg: KnowledgeGraph, loinc: str, value: float, sex: str | None) -> frozenset[str]:
    """The disorders one reading is evidence for: those of each supporting finding on its test
    that the value meets, with their ancestors (a reading for CKD stage 3 is one for CKD: the
    same disorders `supporting_tests` names the test for). A test that bears on a disorder is
    not evidence for it: an HbA1c of 5.2 % argues against prediabetes, and a rationale line
    citing it would read as support. A trend finding (a creatinine rise) is not judged on one
    reading, so any reading of its test counts; a finding for the other sex never does."""
    out: set[str] = set()
    for fd, codes in _supporting_by_test(kg).get(loinc, []):
        if fd.sex is not None and fd.sex != sex:
            continue
        if fd.direction in TRENDS or (math.isfinite(value)
                                      and bool(qualifies(fd, np.array([value]))[0])):
            out |= codes
    return frozenset(out)

"""Per-patient retrieval: abnormal findings (with the readings that triggered them), the disorders
they support or oppose, negation-aware note mentions, and the paths between them.

The rule definitions are read from the graph by SPARQL once per graph version and cached; the
evaluation itself is plain numpy over the patient's lab frame.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from rdflib.namespace import SKOS

from clinragen_fhir.encoding.numbers import format_value
from clinragen_fhir.encoding.schema import Note, PatientContext
from clinragen_fhir.knowledge.graph import CRG, LOINC, PREFIXES, SCT, local

if TYPE_CHECKING:
    from clinragen_fhir.knowledge.graph import KnowledgeGraph

# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class TriggerRow:
    """One lab reading that made a finding fire."""

    observation_id: str
    version_id: str
    loinc: str
    display: str
    value: float
    unit: str
    time: str  # ISO 8601 (UTC)


@dataclass
class FindingHit:
    """A finding detected in this patient's labs."""

    id: str  # URI
    label: str
    loinc: str  # observable(s) that triggered it, comma-separated when several
    direction: str
    threshold: float
    upper_threshold: float | None
    unit: str
    min_count: int
    persistence_days: float
    rows: tuple[TriggerRow, ...]
    strength: float = 0.0  # strongest association it takes part in (ranking)


@dataclass(frozen=True)
class SupportRef:
    """One fact behind a disorder's score."""

    fact: str  # URI of the crg:Association (or the note rule)
    evidence: str  # finding URI, or "DocumentReference/<id>#start-end" for a note mention
    strength: float
    source: str  # source label, e.g. "ADA 2024"
    source_uri: str


@dataclass
class DisorderSupport:
    """A disorder with the facts for and against it; score in [0, 1]."""

    snomed: str
    uri: str
    term: str
    score: float
    supporting: list[SupportRef] = field(default_factory=list)
    opposing: list[SupportRef] = field(default_factory=list)
    conclusion_threshold: float = 1.0


@dataclass(frozen=True)
class NoteMention:
    """A concept found in a note."""

    concept: str  # URI
    code: str  # SNOMED id
    kind: str  # "disorder" | "symptom"
    term: str  # the text matched
    negated: bool
    document_id: str
    start: int
    end: int


@dataclass(frozen=True)
class PathStep:
    """An edge of the explanation graph: finding/mention -> disorder."""

    source: str
    relation: str  # "supports" | "opposes" | "mentions" | "negates"
    target: str
    fact: str
    strength: float


@dataclass
class Retrieval:
    """What the knowledge says about one patient."""

    knowledge_version: str
    findings: list[FindingHit]
    disorders: list[DisorderSupport]
    note_mentions: list[NoteMention]
    paths: list[PathStep]
    labels: dict[str, str] = field(default_factory=dict)
    unknown_codes: list[str] = field(default_factory=list)  # LOINC codes the graph lacks
    lab_names: dict[str, str] = field(default_factory=dict)  # LOINC -> the graph's short name

    def facts(self) -> list[tuple[str, str, str]]:
        """(subject label, relation, object label) triples for the model to embed."""
        out: list[tuple[str, str, str]] = []
        for f in self.findings:
            for r in f.rows[-3:]:
                out.append((f.label, "observed as", f"{r.display or r.loinc} "
                            f"{format_value(r.value)} {r.unit} on {r.time[:10]}"))
        for p in self.paths:
            out.append((self.labels.get(p.source, p.source), p.relation,
                        self.labels.get(p.target, p.target)))
        return out


# ---------------------------------------------------------------------------------------------
# rule index, read from the graph once per version


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
        key = _term_key(t)
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


# ---------------------------------------------------------------------------------------------
# notes

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


_TOKEN = re.compile(r"\w+|[^\w\s]")


def _term_key(term: str) -> tuple[str, ...]:
    """Token tuple of a term: lower-cased, except short or all-capital abbreviations (CKD, AF),
    which must match case-sensitively so that e.g. "af" in ordinary text does not."""
    tokens = _TOKEN.findall(term)
    if len(term) < _GROUPING_MIN_LEN or term.isupper():
        return ("\0", *tokens)
    return tuple(t.lower() for t in tokens)


def find_mentions(kg: KnowledgeGraph, notes: Sequence[Note]) -> list[NoteMention]:
    """Disorder and symptom terms in the notes (longest match first), with span and negation."""
    index = rule_index(kg)
    out: list[NoteMention] = []
    for note in notes:
        spans = [(m.start(), m.end()) for m in _TOKEN.finditer(note.text)]
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


# ---------------------------------------------------------------------------------------------
# labs


def _qualifies(fd: FindingDef, values: np.ndarray) -> np.ndarray:
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


def _rows(cols: dict[str, np.ndarray], idx: Sequence[int]) -> tuple[TriggerRow, ...]:
    out = []
    for i in idx:
        t = cols["time"][i]
        out.append(TriggerRow(str(cols["observation_id"][i]), str(cols["version_id"][i]),
                              str(cols["loinc"][i]), str(cols["display"][i]),
                              float(cols["value"][i]), str(cols["unit"][i]),
                              t.isoformat() if hasattr(t, "isoformat") else str(t)))
    return tuple(out)


def _days(frame: pd.DataFrame) -> np.ndarray:
    """Reading times as days since the epoch (UTC), for window and persistence arithmetic."""
    t = pd.to_datetime(frame["time"], utc=True)
    return np.asarray((t - pd.Timestamp(0, tz="UTC")).dt.total_seconds(), dtype=float) / 86400.0


def _evaluate(fd: FindingDef, all_values: np.ndarray, all_days: np.ndarray,
              sub: np.ndarray) -> list[int] | None:
    """Positions (into frame) of the readings that make the finding fire, or None."""
    if len(sub) == 0:
        return None
    values = all_values[sub]
    times = all_days[sub]
    if fd.direction in ("rise", "fold-rise"):
        order = np.argsort(times, kind="stable")
        v, t, pos = values[order], times[order], sub[order]
        for j in range(1, len(v)):
            earlier = np.nonzero((t[:j] >= t[j] - fd.window_days) & (t[:j] < t[j]))[0]
            if len(earlier) == 0:
                continue
            base = earlier[np.argmin(v[earlier])]
            rise = v[j] - v[base] if fd.direction == "rise" else (
                v[j] / v[base] if v[base] > 0 else 0.0)
            if rise >= fd.threshold:
                return [int(pos[base]), int(pos[j])]
        return None
    ok = _qualifies(fd, values)
    if int(ok.sum()) < max(fd.min_count, 1):
        return None
    qt = times[ok]
    if fd.min_span_days and float(qt.max() - qt.min()) < fd.min_span_days:
        return None
    hits = sub[ok]
    return [int(i) for i in hits[np.argsort(times[ok], kind="stable")]]


def _combine(strengths: Sequence[float]) -> float:
    """Noisy-OR: independent pieces of evidence add up without exceeding 1."""
    p = 1.0
    for s in strengths:
        p *= 1.0 - min(max(s, 0.0), 1.0)
    return 1.0 - p


MAX_TRIGGER_ROWS = 6  # first and the latest readings kept per finding: bounded output


def retrieve(kg: KnowledgeGraph, labs: pd.DataFrame, notes: Sequence[Note],
             patient: PatientContext) -> Retrieval:
    """The knowledge relevant to this patient, ranked, every item with its ids."""
    index = rule_index(kg)
    frame = labs.reset_index(drop=True) if labs is not None else pd.DataFrame()
    findings: list[FindingHit] = []
    unknown: list[str] = []
    if not frame.empty:
        codes = frame["loinc"].astype(str).to_numpy()
        unknown = sorted({c for c in codes if kg.lab(c) is None})
        all_values = frame["value"].to_numpy(dtype=float)
        all_days = _days(frame)
        finite = np.isfinite(all_values) & np.isfinite(all_days)
        positions = {c: np.nonzero((codes == c) & finite)[0] for c in set(codes)}
        cols = {c: frame[c].to_numpy(dtype=object) for c in
                ("observation_id", "version_id", "loinc", "display", "unit", "time")}
        cols["value"] = all_values
        for fd in index.findings:
            if fd.sex is not None and fd.sex != patient.sex:
                continue
            sub = [positions[c] for c in fd.observables if c in positions]
            if not sub:
                continue
            fired = _evaluate(fd, all_values, all_days, np.concatenate(sub))
            if fired is None:
                continue
            keep = (fired if len(fired) <= MAX_TRIGGER_ROWS
                    else [fired[0], *fired[-(MAX_TRIGGER_ROWS - 1):]])
            rows = _rows(cols, keep)
            lab = kg.lab(rows[0].loinc)
            findings.append(FindingHit(
                fd.uri, fd.label, ",".join(sorted({r.loinc for r in rows})), fd.direction,
                fd.threshold, fd.upper, lab.canonical_unit if lab else rows[0].unit,
                fd.min_count, fd.min_span_days, rows,
                max((a.strength for a in index.assocs_by_finding.get(fd.uri, [])), default=0.0)))
    mentions = find_mentions(kg, notes)

    support: dict[str, DisorderSupport] = {}
    paths: list[PathStep] = []

    def entry(uri: str) -> DisorderSupport:
        if uri not in support:
            code = local(uri, SCT)
            dis = kg.disorder(code)
            support[uri] = DisorderSupport(
                code, uri, dis.term if dis else index.labels.get(uri, code), 0.0,
                conclusion_threshold=index.disorder_threshold.get(uri, index.default_threshold))
        return support[uri]

    for hit in findings:
        for a in index.assocs_by_finding.get(hit.id, []):
            ref = SupportRef(a.uri, hit.id, a.strength, a.source_label, a.source)
            (entry(a.disorder).supporting if a.polarity == "supports"
             else entry(a.disorder).opposing).append(ref)
            paths.append(PathStep(hit.id, a.polarity, a.disorder, a.uri, a.strength))
    seen_mention: set[tuple[str, bool]] = set()
    for m in mentions:
        if m.kind != "disorder" or (m.concept, m.negated) in seen_mention:
            continue
        seen_mention.add((m.concept, m.negated))  # one note fact per disorder and polarity
        ref = SupportRef(index.note_source, f"{m.document_id}#{m.start}-{m.end}",
                         index.note_strength, index.note_source_label, index.note_source)
        d = entry(m.concept)
        (d.opposing if m.negated else d.supporting).append(ref)
        paths.append(PathStep(f"{m.document_id}#{m.start}-{m.end}",
                              "negates" if m.negated else "mentions", m.concept,
                              index.note_source, index.note_strength))
    for d in support.values():
        d.score = round(_combine([s.strength for s in d.supporting])
                        * (1.0 - _combine([s.strength for s in d.opposing])), 4)
    disorders = sorted(support.values(), key=lambda d: (-d.score, d.snomed))
    findings.sort(key=lambda f: (-f.strength, f.id))
    labels = dict(index.labels)
    for m in mentions:
        labels[f"{m.document_id}#{m.start}-{m.end}"] = f"note {m.document_id} \"{m.term}\""
    names = {} if frame.empty else {
        c: lab.name for c in frame["loinc"].astype(str).unique() if (lab := kg.lab(c)) is not None}
    return Retrieval(kg.version, findings, disorders, mentions, paths, labels, unknown, names)


__all__ = ["CRG", "DisorderSupport", "FindingHit", "NoteMention", "PathStep", "Retrieval",
           "SupportRef", "TriggerRow", "find_mentions", "retrieve", "rule_index"]

"""The finding rules evaluated on the patient's lab frame (plain numpy), and `retrieve`, which
joins the findings with the note mentions into the disorders' support and the paths."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from clinragen_fhir.encoding.schema import Note, PatientContext, Reading
from clinragen_fhir.encoding.times import DAY_SECONDS, epoch_seconds
from clinragen_fhir.knowledge.graph import SCT, local
from clinragen_fhir.knowledge.retrieval.mentions import find_mentions
from clinragen_fhir.knowledge.retrieval.results import (
    DisorderSupport,
    FindingHit,
    PathStep,
    Retrieval,
    SupportRef,
)
from clinragen_fhir.knowledge.retrieval.rules import FindingDef, qualifies, rule_index

if TYPE_CHECKING:
    from clinragen_fhir.knowledge.graph import KnowledgeGraph


def _rows(cols: dict[str, np.ndarray], idx: Sequence[int]) -> tuple[Reading, ...]:
    out = []
    for i in idx:
        t = cols["time"][i]
        out.append(Reading(str(cols["observation_id"][i]), str(cols["version_id"][i]),
                           str(cols["loinc"][i]), str(cols["display"][i]),
                           float(cols["value"][i]), str(cols["unit"][i]),
                           t.isoformat() if hasattr(t, "isoformat") else str(t)))
    return tuple(out)


def _days(frame: pd.DataFrame) -> np.ndarray:
    """Reading times as days since the epoch (UTC), for window and persistence arithmetic."""
    return epoch_seconds(frame["time"]) / DAY_SECONDS


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
    ok = qualifies(fd, values)
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

"""The knowledge-rule baseline: conclude what the graph's findings support, cite the readings.

Every threshold (finding thresholds, the support needed to conclude) is read from the graph, so
the baseline changes with the knowledge, not with code.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from clinragen_fhir.encoding.numbers import format_value
from clinragen_fhir.encoding.schema import Note, PatientContext
from clinragen_fhir.identity import RULE_BASELINE
from clinragen_fhir.knowledge import KnowledgeGraph, retrieve
from clinragen_fhir.knowledge.retrieval import (
    DisorderSupport,
    FindingHit,
    Retrieval,
)
from clinragen_fhir.predict.types import (
    Diagnosis,
    Evidence,
    Identity,
    Prediction,
    abstain_without_inputs,
    has_inputs,
)

METHOD_VERSION = "1"
_SYMBOL = {"high": ">=", "above": ">", "low": "<"}


def _criterion(f: FindingHit) -> str:
    if f.direction == "range":
        return (f">= {format_value(f.threshold)} and < "
                f"{format_value(f.upper_threshold or 0)} {f.unit}")
    if f.direction == "rise":
        return f"rise >= {format_value(f.threshold)} {f.unit}"
    if f.direction == "fold-rise":
        return f"rise >= {format_value(f.threshold)} x baseline"
    return f"{_SYMBOL.get(f.direction, f.direction)} {format_value(f.threshold)} {f.unit}"


def _persistence(f: FindingHit) -> str:
    return f", persisting >= {f.persistence_days:.0f} days" if f.persistence_days else ""


class RuleBaseline:
    """Concludes disorders whose knowledge support reaches the graph's threshold."""

    name = "knowledge-rule-baseline"

    def __init__(self, kg: KnowledgeGraph) -> None:
        self.kg = kg

    def identity(self) -> Identity:
        """The maker its predictions name (`predict.types.declared_identity`)."""
        return self.name, METHOD_VERSION, self.kg.version, RULE_BASELINE

    def predict(self, labs: pd.DataFrame, notes: Sequence[Note], patient: PatientContext,
                retrieval: Retrieval | None = None) -> Prediction:
        """One Prediction: diagnoses with evidence and a rationale citing values and dates.
        `retrieval`: this patient's, when the caller already ran it (the model's fallback)."""
        base = Prediction(self.name, METHOD_VERSION, self.kg.version, [], "")
        if not has_inputs(labs, notes):
            return abstain_without_inputs(base)
        r = retrieval if retrieval is not None and retrieval.knowledge_version == self.kg.version \
            else retrieve(self.kg, labs if labs is not None else pd.DataFrame(), notes, patient)
        sex, age = patient.sex, patient.age_years()
        concluded = [d for d in r.disorders if d.supporting and d.score >= d.conclusion_threshold
                     and self.kg.possible(d.snomed, sex, age)]
        # the same helpers as `predict.conclude`: a parent adds nothing beside its child
        keep = set(self.kg.most_specific([d.snomed for d in concluded]))
        concluded = [d for d in concluded if d.snomed in keep]
        findings = {f.id: f for f in r.findings}
        diagnoses = [self._diagnosis(d, findings, r) for d in concluded]
        base.diagnoses = diagnoses
        base.facts_used = sorted({k for dx in diagnoses for k in dx.knowledge})
        base.rationale = self._rationale(concluded, findings, r, labs, notes)
        return base

    def _diagnosis(self, d: DisorderSupport, findings: dict[str, FindingHit],
                   r: Retrieval) -> Diagnosis:
        evidence: list[Evidence] = []
        knowledge: list[str] = []
        for s in d.supporting:
            knowledge.append(s.fact)
            f = findings.get(s.evidence)
            if f is not None:
                knowledge.append(f.id)
                for row in f.rows:
                    evidence.append(Evidence.of_reading(
                        row,
                        f"{row.describe(was=True)} ({_criterion(f)}{_persistence(f)}; {s.source})"))
            else:
                doc, _, span = s.evidence.partition("#")
                term = next((m.term for m in r.note_mentions
                             if f"{m.document_id}#{m.start}-{m.end}" == s.evidence), d.term)
                evidence.append(Evidence(doc, "", "", "note", None, "", "",
                                         f"note mentions \"{term}\" (characters {span})"))
        return Diagnosis(d.snomed, d.term, d.score, tuple(dict.fromkeys(evidence)),
                         tuple(dict.fromkeys(knowledge)))

    def _rationale(self, concluded: list[DisorderSupport], findings: dict[str, FindingHit],
                   r: Retrieval, labs: pd.DataFrame, notes: Sequence[Note]) -> str:
        n_labs = 0 if labs is None else len(labs)
        if not concluded:
            if r.findings:
                seen = "; ".join(f"{f.label}: {f.rows[-1].describe(was=True)}"
                                 for f in r.findings[:5])
                return (f"No disorder supported: {n_labs} readings and {len(notes)} notes checked; "
                        f"abnormal findings ({seen}) did not reach the graph's threshold.")
            return (f"No disorder supported: {n_labs} readings and {len(notes)} notes checked; "
                    "no abnormal finding was detected.")
        parts = []
        for d in concluded:
            reasons = []
            for s in d.supporting:
                f = findings.get(s.evidence)
                if f is not None:
                    last = f.rows[-1]
                    more = f" ({len(f.rows)} readings{_persistence(f)})" if len(f.rows) > 1 else ""
                    reasons.append(f"{last.describe(was=True)}{more} ({_criterion(f)}, {s.source})")
                else:
                    reasons.append(f"mentioned in {s.evidence.partition('#')[0]}")
            against = [findings[s.evidence].label for s in d.opposing if s.evidence in findings]
            tail = f"; against: {', '.join(against)}" if against else ""
            parts.append(f"{d.term} (SNOMED {d.snomed}, support {d.score:.2f}): "
                         + "; ".join(dict.fromkeys(reasons)) + tail + ".")
        return " ".join(parts)

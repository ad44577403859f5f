"""Known or suspected: each concluded disorder against the patient's problem list.

The model concludes from labs, vital signs and notes; it never takes Conditions as input. At
report time `compare` marks each concluded disorder (`Diagnosis.problem`):

* **known**: an active Condition on the list is coded with that disorder or a more specific one
  (a SNOMED CT descendant, `KnowledgeGraph.descendants`: the IS-A hierarchy between the graph's
  disorders; a code outside the graph matches only itself). ICD-10-CM / ICD-10 codings are
  mapped to SNOMED CT by the graph (`snomed_for_icd10`). The earliest onset (else recorded
  date) among the matching Conditions is the "since" date.
* **suspected**: the list was read and holds neither.
* **not-checked**: the list was not read (the check off, the search refused or failing), with
  the reason: the report then says so, and never calls the disorders suspected.

Each `conclusionCode` carries the `problem-list` extension (status, and for a known one the
Condition, the code on the list and the date; for not-checked the reason), defined in
`profiles/problem-list.json`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from clinragen_fhir.fhir.conditions import ListedCondition, ProblemList
from clinragen_fhir.fhir.resources import SNOMED
from clinragen_fhir.knowledge import KnowledgeGraph
from clinragen_fhir.predict.types import Diagnosis, Prediction, ProblemMatch

PROBLEM_LIST_EXT = "https://clinragen-fhir.org/StructureDefinition/problem-list"
KNOWN, SUSPECTED, NOT_CHECKED = "known", "suspected", "not-checked"
STATUSES = (SUSPECTED, KNOWN, NOT_CHECKED)  # the order a clinician reads them in
ICD10 = ("http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10")
MATCHING = ("a Condition on the list counts when it is coded with the concluded disorder or a "
            "more specific one (SNOMED CT, the knowledge graph's hierarchy; ICD-10-CM mapped)")


def _snomed_codes(condition: ListedCondition, kg: KnowledgeGraph) -> list[tuple[str, str]]:
    """(SNOMED code, display) of each coding, ICD-10 ones mapped through the graph."""
    out = []
    for system, code, display in condition.codings:
        if system == SNOMED:
            out.append((code, display))
        elif system in ICD10:
            mapped = kg.snomed_for_icd10(code)
            if mapped:
                concept = kg.disorder(mapped)
                out.append((mapped, display or (concept.term if concept else "")))
    return out


def match(d: Diagnosis, problems: ProblemList, kg: KnowledgeGraph) -> ProblemMatch:
    """One concluded disorder against the list (see the module docstring)."""
    if not problems.checked:
        return ProblemMatch(NOT_CHECKED, reason=problems.reason)
    wanted = {d.snomed} | kg.descendants(d.snomed)
    hits = [(c.since or "9999", c, code, display) for c in problems.conditions
            for code, display in _snomed_codes(c, kg) if code in wanted]
    if not hits:
        return ProblemMatch(SUSPECTED)
    # the earliest dated one (undated last); the concluded code itself before a descendant
    _, cond, code, display = min(hits, key=lambda h: (h[0], h[2] != d.snomed, h[1].reference))
    return ProblemMatch(KNOWN, condition=cond.reference, code=code, display=display,
                        since=cond.since)


def compare(prediction: Prediction, problems: ProblemList, kg: KnowledgeGraph) -> Prediction:
    """The prediction with each concluded disorder marked known, suspected or not-checked."""
    return replace(prediction, diagnoses=[replace(d, problem=match(d, problems, kg))
                                          for d in prediction.diagnoses])


def counts(prediction: Prediction) -> dict[str, int]:
    """Concluded disorders by status ({} when none was compared): the outcome's and the demo
    summary's figures."""
    return dict(Counter(d.problem.status for d in prediction.diagnoses if d.problem))


def fingerprint_part(prediction: Prediction) -> list[list[str]] | None:
    """What the content fingerprint adds: per concluded disorder its status, the Condition (no
    version: an edit that keeps it on the list changes nothing) and the date. None when the list
    was not read, so reports written with the check off keep the fingerprint they had."""
    if not any(d.problem and d.problem.status != NOT_CHECKED for d in prediction.diagnoses):
        return None
    return [[d.snomed, d.problem.status, d.problem.condition.partition("/_history/")[0],
             d.problem.code, d.problem.since] if d.problem else [d.snomed, ""]
            for d in prediction.diagnoses]


def extension(match: ProblemMatch | None) -> list[dict[str, Any]]:
    """The `problem-list` extension of one conclusionCode ([] when it was never compared)."""
    if match is None:
        return []
    parts: list[dict[str, Any]] = [{"url": "status", "valueCode": match.status}]
    if match.condition:
        parts.append({"url": "condition", "valueReference": {"reference": match.condition}})
    if match.code:
        coding = {"system": SNOMED, "code": match.code}
        parts.append({"url": "code", "valueCoding": {**coding, "display": match.display}
                      if match.display else coding})
    if match.since:
        parts.append({"url": "since", "valueDateTime": match.since})
    if match.reason:
        parts.append({"url": "reason", "valueString": match.reason})
    return [{"url": PROBLEM_LIST_EXT, "extension": parts}]


def read_extension(concept: Any) -> dict[str, str]:
    """A stored conclusionCode's `problem-list` extension as {status, condition, code, since,
    reason} ({} when absent: a report from before the check)."""
    if not isinstance(concept, dict):
        return {}
    for ext in concept.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == PROBLEM_LIST_EXT:
            out: dict[str, str] = {}
            for p in ext.get("extension") or []:
                if not isinstance(p, dict):
                    continue
                value = p.get("valueCode") or p.get("valueString") or p.get("valueDateTime") \
                    or (p.get("valueReference") or {}).get("reference") \
                    or (p.get("valueCoding") or {}).get("code")
                if isinstance(value, str):
                    out[str(p.get("url"))] = value
            return out
    return {}


def known_conditions(prediction: Prediction) -> list[str]:
    """The Conditions that made a disorder known, once each: inputs of the report's content,
    listed in its Provenance."""
    return list(dict.fromkeys(d.problem.condition for d in prediction.diagnoses
                              if d.problem and d.problem.status == KNOWN
                              and d.problem.condition))


def grouped(diagnoses: Sequence[Diagnosis]) -> list[tuple[str, list[Diagnosis]]]:
    """The diagnoses by status in reading order (suspected, known, not checked, then any never
    compared as ""), each group in the report's order; empty groups left out."""
    order = [*STATUSES, ""]
    groups: dict[str, list[Diagnosis]] = {s: [] for s in order}
    for d in diagnoses:
        groups[d.problem.status if d.problem and d.problem.status in STATUSES else ""].append(d)
    return [(s, groups[s]) for s in order if groups[s]]


def since_text(match: ProblemMatch) -> str:
    """'on the problem list since 2019-04-02' (as the listed code, when more specific)."""
    when = f"since {match.since}" if match.since else "(date not recorded)"
    return f"on the problem list {when}"

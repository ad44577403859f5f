"""What every predictor returns, so reports are written one way whatever the method."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Evidence:
    """One lab reading (or note mention) a conclusion cites: enough to re-check it later."""

    reference: str  # "Observation/<id>" or "DocumentReference/<id>"
    version_id: str
    loinc: str
    display: str
    value: float | None
    unit: str
    time: str  # ISO 8601
    statement: str  # e.g. "HbA1c 7.1 % on 2024-03-02 (high; >= 6.5 %)"


@dataclass(frozen=True)
class Diagnosis:
    """One disorder concluded, with the facts that support it."""

    snomed: str
    term: str
    probability: float  # the rule baseline gives a support score in [0, 1]
    evidence: tuple[Evidence, ...] = ()
    knowledge: tuple[str, ...] = ()  # ids (URIs) of the knowledge facts used


@dataclass
class Prediction:
    """A predictor's whole answer for one patient."""

    method: str  # e.g. "knowledge-rule-baseline" or "clinragen-onnx"
    method_version: str
    knowledge_version: str
    diagnoses: list[Diagnosis]
    rationale: str
    abstained: bool = False  # True: not enough data or confidence to say anything
    abstain_reason: str = ""
    facts_used: list[str] = field(default_factory=list)
    # identity.model_identity of the artifact that concluded this ("" : the rule baseline)
    model_id: str = ""

"""What every predictor is and returns, so reports are written one way whatever the method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import pandas as pd

    from clinragen_fhir.encoding.schema import Note, PatientContext, Reading


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

    @classmethod
    def of_reading(cls, r: Reading, statement: str | None = None) -> Evidence:
        """A lab reading cited as it is written (`Reading.describe`), unless `statement`."""
        return cls(r.observation_id, r.version_id, r.loinc, r.display, r.value, r.unit, r.time,
                   r.describe() if statement is None else statement)


@dataclass(frozen=True)
class ProblemMatch:
    """How one concluded disorder stands against the patient's problem list (the active
    Conditions), found at report time by `report.problem_list`: never a model input."""

    status: str  # "known" | "suspected" | "not-checked"
    condition: str = ""  # known: the Condition on the list, "Condition/<id>/_history/<n>"
    code: str = ""  # known: the SNOMED CT code on the list (the concluded one or a descendant)
    display: str = ""  # known: that code's display
    since: str = ""  # known: the Condition's onset, else its recorded date (YYYY-MM-DD; "": none)
    reason: str = ""  # not-checked: why (the check is off, the server refused the search, ...)


@dataclass(frozen=True)
class Diagnosis:
    """One disorder concluded, with the facts that support it."""

    snomed: str
    term: str
    probability: float  # the rule baseline gives a support score in [0, 1]
    evidence: tuple[Evidence, ...] = ()
    knowledge: tuple[str, ...] = ()  # ids (URIs) of the knowledge facts used
    problem: ProblemMatch | None = None  # None: not compared with the problem list (set later)


@dataclass(frozen=True)
class Withheld:
    """A disorder that reached its threshold but the report's limit of codes left out: the report
    names it (nothing the model found is hidden), and it is not a conclusion."""

    snomed: str
    term: str
    probability: float


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
    # above threshold but over the cap (`predict.conclude.OVER_CAP`), most probable first
    withheld: list[Withheld] = field(default_factory=list)


class Predictor(Protocol):
    """What the pipeline calls: the rule baseline (`predict.rules.RuleBaseline`), the ONNX model
    (`inference.predictor.OnnxPredictor`), the two with a fallback
    (`inference.fallback.ModelOrBaseline`) and the torch model (`model.clinragen.ClinRaGen`)."""

    name: str

    def predict(self, labs: pd.DataFrame, notes: list[Note],
                patient: PatientContext) -> Prediction: ...


NO_INPUT = "no usable lab results or notes"  # a predictor's abstain reason without inputs


def has_inputs(labs: pd.DataFrame | None, notes: Sequence[Note]) -> bool:
    """Whether there is anything to predict from: a lab reading or a note. The pipeline skips a
    patient without (no report); a predictor called directly abstains (`abstain_without_inputs`)."""
    return (labs is not None and not labs.empty) or bool(notes)


def abstain_without_inputs(prediction: Prediction) -> Prediction:
    """`prediction` (with no diagnoses) marked as abstaining for want of inputs."""
    prediction.abstained, prediction.abstain_reason = True, NO_INPUT
    prediction.rationale = f"Abstained: the patient has {NO_INPUT}."
    return prediction


# (method, method version, knowledge version, model identity): what a prediction's report names
# its maker by (`report.build.model_of` gives the last for a prediction)
Identity = tuple[str, str, str, str]


def declared_identity(predictor: object) -> Identity | None:
    """The identity a predictor's predictions will carry, where it says so before predicting
    (an `identity()` method: the rule baseline, the model with its fallback); else None."""
    identity = getattr(predictor, "identity", None)
    return identity() if callable(identity) else None

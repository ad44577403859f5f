"""The model's InputTooLong fallback: the rule baseline takes the retrieval the model ran
(issue 16, item 7), and writes the same prediction as when it runs retrieval itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import pytest

import clinragen_fhir.predict.rules as rules_mod
from clinragen_fhir.encoding.schema import Note, PatientContext
from clinragen_fhir.inference.errors import InputTooLong
from clinragen_fhir.inference.fallback import ModelOrBaseline
from clinragen_fhir.knowledge import load_graph, retrieve
from clinragen_fhir.predict.rules import RuleBaseline
from clinragen_fhir.predict.types import Prediction
from tests.unit.test_knowledge import frame

PATIENT = PatientContext("p1", sex="female")


class TooLong:
    """A model that ran retrieval, then found its input over a declared limit."""

    name = "clinragen-onnx"

    def __init__(self, kg: Any) -> None:
        self.kg = kg

    def predict(self, labs: pd.DataFrame, notes: Sequence[Note],
                patient: PatientContext) -> Prediction:
        exc = InputTooLong("model/onnx/manifest.json", "lab readings", 900, 512)
        exc.retrieval = retrieve(self.kg, labs, notes, patient)
        raise exc


def test_the_baseline_reuses_the_models_retrieval(monkeypatch: pytest.MonkeyPatch) -> None:
    kg = load_graph()
    labs = frame([("4548-4", 7.1, "2024-03-02"), ("4548-4", 7.4, "2024-06-02")])
    alone = RuleBaseline(kg).predict(labs, [], PATIENT)
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return retrieve(*args, **kwargs)

    monkeypatch.setattr(rules_mod, "retrieve", counted)
    both = ModelOrBaseline(TooLong(kg), RuleBaseline(kg))  # type: ignore[arg-type]
    p = both.predict(labs, [], PATIENT)
    assert calls == []  # the baseline ran no retrieval of its own
    assert "lab readings is 900, over the limit of 512" in p.rationale
    assert [d.snomed for d in p.diagnoses] == [d.snomed for d in alone.diagnoses]
    assert p.rationale.endswith(alone.rationale)

"""OnnxPredictor on an input over the graphs' limits (issue 16, item 7): a one-patient chunk's
InputTooLong carries the retrieval the predictor ran, so `ModelOrBaseline`'s rule baseline runs
none of its own; a larger chunk's does not (the fallback runs its patients one at a time)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

import clinragen_fhir.predict.rules as rules_mod
from clinragen_fhir.encoding.features import Budgets
from clinragen_fhir.encoding.schema import PatientContext
from clinragen_fhir.inference.errors import InputTooLong
from clinragen_fhir.inference.fallback import ModelOrBaseline
from clinragen_fhir.inference.model_config import ModelConfig
from clinragen_fhir.inference.predictor import OnnxPredictor
from clinragen_fhir.knowledge import load_graph, retrieve
from clinragen_fhir.predict.rules import RuleBaseline
from tests.unit.test_knowledge import frame

PATIENT = PatientContext("p1", sex="female")


class _Tokens:
    def encode(self, text: str, pair: str | None = None, is_pretokenized: bool = False,
               add_special_tokens: bool = True) -> Any:
        return SimpleNamespace(ids=[3] * min(len(text.split()), 8))


class _TooLongModel:
    def __init__(self, kg: Any) -> None:
        self.config = ModelConfig(["4548-4"], ["44054006"], ["Diabetes mellitus type 2"],
                                  kg.version, Budgets())
        self.tokenizer = _Tokens()
        self.loinc_vocab = {"4548-4": 2}

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise InputTooLong("model/onnx/manifest.json", "lab readings", 900, 512)


def test_a_one_patient_chunk_carries_its_retrieval(monkeypatch: pytest.MonkeyPatch) -> None:
    kg = load_graph()
    labs = frame([("4548-4", 7.1, "2024-03-02"), ("4548-4", 7.4, "2024-06-02")])
    model = OnnxPredictor(_TooLongModel(kg), kg)  # type: ignore[arg-type]
    with pytest.raises(InputTooLong) as one:
        model.predict(labs, [], PATIENT)
    assert one.value.retrieval is not None
    assert [d.snomed for d in one.value.retrieval.disorders] == \
        [d.snomed for d in retrieve(kg, labs, [], PATIENT).disorders]
    with pytest.raises(InputTooLong) as two:
        model.predict_batch([(labs, [], PATIENT), (labs, [], PatientContext("p2"))])
    assert two.value.retrieval is None  # whose would it be

    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return retrieve(*args, **kwargs)

    monkeypatch.setattr(rules_mod, "retrieve", counted)
    p = ModelOrBaseline(model, RuleBaseline(kg)).predict(labs, [], PATIENT)
    assert calls == []  # the baseline took the model's retrieval
    assert "lab readings is 900, over the limit of 512" in p.rationale

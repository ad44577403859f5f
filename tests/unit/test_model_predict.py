"""`ClinRaGen.predict` concludes by `predict.conclude`: the head decides, not the generated
`Diagnosis:` line; sex/age, the cap and per-disorder thresholds come from the config."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from clinragen_fhir.encoding.schema import PatientContext  # noqa: E402
from clinragen_fhir.knowledge import load_graph  # noqa: E402
from model.clinragen import ClinRaGen, ClinRaGenConfig, Explanation  # noqa: E402
from tests.unit.test_model import build, features  # noqa: E402
from tests.unit.test_model_features import lab_frame  # noqa: E402

T2DM, HTN = "44054006", "38341003"  # the tiny model's two disorders, in this order


@pytest.fixture(scope="module")
def model() -> ClinRaGen:
    m = build()
    m.kg = load_graph()
    return m


def predict(model: ClinRaGen, monkeypatch: pytest.MonkeyPatch, text: str,
            probs: list[float], patient: PatientContext | None = None) -> Any:
    """`predict` with the generated text and head probabilities fixed."""
    feats = features(model)
    monkeypatch.setattr(model, "featurise", lambda *a, **k: feats)
    monkeypatch.setattr(model, "generate",
                        lambda batch, *a, **k: ([text], torch.zeros((1, 1), dtype=torch.long)))
    monkeypatch.setattr(model, "probabilities", lambda batch: torch.tensor([probs]))
    monkeypatch.setattr(model, "explain", lambda *a, **k: [Explanation([], [], [])])
    labs = lab_frame([("A", 120.0, "2024-01-01", 70.0, 130.0)])
    return model.predict(labs, [], patient or PatientContext("p"))


def test_a_diagnosis_line_code_under_threshold_is_not_concluded(
        model: ClinRaGen, monkeypatch: pytest.MonkeyPatch) -> None:
    text = f"Glucose is high.\nDiagnosis: {T2DM} diabetes; {HTN} hypertension"
    p = predict(model, monkeypatch, text, [0.9, 0.0])
    assert [d.snomed for d in p.diagnoses] == [T2DM] and not p.abstained
    assert p.rationale == "Glucose is high."


def test_thresholds_and_cap_come_from_the_config(model: ClinRaGen,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model, "config", ClinRaGenConfig(
        **{**model.config.__dict__, "thresholds": {HTN: 0.3}, "max_codes": 1}))
    man = PatientContext("p", sex="male", birth_date=datetime(1980, 1, 1, tzinfo=UTC),
                         index_time=datetime(2024, 3, 3, tzinfo=UTC))
    assert [d.snomed for d in predict(model, monkeypatch, "Diagnosis: none", [0.2, 0.35],
                                      man).diagnoses] == [HTN]
    assert [d.snomed for d in predict(model, monkeypatch, "", [0.9, 0.95]).diagnoses] == [HTN]


def test_config_without_the_new_fields_still_loads(model: ClinRaGen) -> None:
    import json

    d = json.loads(model.config.to_json())
    assert d["thresholds"] == {} and d["max_codes"] == 3
    del d["thresholds"], d["max_codes"]
    cfg = ClinRaGenConfig.from_json(json.dumps(d))
    assert cfg.thresholds == {} and cfg.max_codes == 3

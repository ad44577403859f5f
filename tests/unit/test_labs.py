"""The lab frame from real and hand-made Observations: units, components, skips with reasons."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from clinragen_fhir.encoding.labs import MAX_READINGS, build_lab_frame
from clinragen_fhir.encoding.schema import LAB_COLUMNS, PatientContext
from clinragen_fhir.knowledge import KnowledgeGraph, load_graph
from tests.conftest import read_bundle

NOW = datetime(2025, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def kg() -> KnowledgeGraph:
    return load_graph()


def obs(rid: str, loinc: str, value: Any = 5.0, unit: str = "mg/dL",
        when: str = "2024-05-01T10:00:00Z", category: str = "laboratory",
        **extra: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "resourceType": "Observation", "id": rid, "status": "final",
        "category": [{"coding": [{"code": category}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": loinc}], "text": loinc},
        "subject": {"reference": "Patient/p"}, "effectiveDateTime": when, **extra}
    if value is not None:
        r["valueQuantity"] = {"value": value, "unit": unit, "code": unit,
                              "system": "http://unitsofmeasure.org"}
    return r


def test_real_patient_frame(kg: KnowledgeGraph, patient_bundles: list[Path]) -> None:
    resources = [e["resource"] for e in read_bundle(patient_bundles[0])["entry"]]
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    frame, skips = build_lab_frame(observations, kg, PatientContext("p"))
    assert list(frame.columns) == list(LAB_COLUMNS)
    assert len(frame) > 0
    assert frame["time"].is_monotonic_increasing
    assert str(frame["time"].dt.tz) == "UTC"
    # Every Observation is either used or skipped with a reason: none vanishes.
    used = set(frame["observation_id"])
    skipped = {s.reference for s in skips}
    assert used | skipped == {f"Observation/{o['id']}" for o in observations}
    assert all(s.reason for s in skips)


def test_units_are_converted_to_the_canonical_unit(kg: KnowledgeGraph) -> None:
    frame, skips = build_lab_frame([obs("g", "2339-0", 5.5, "mmol/L")], kg, now=NOW)
    assert not skips
    row = frame.iloc[0]
    assert row["unit"] == "mg/dL" and row["value"] == pytest.approx(99.1, abs=0.5)
    assert row["raw_value"] == 5.5 and row["raw_unit"] == "mmol/L"


def test_blood_pressure_panel_expands_into_components(kg: KnowledgeGraph) -> None:
    bp = obs("bp", "85354-9", None, category="vital-signs", component=[
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
         "valueQuantity": {"value": 150, "code": "mm[Hg]"}},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
         "valueQuantity": {"value": 95, "code": "mm[Hg]"}}])
    frame, skips = build_lab_frame([bp], kg, now=NOW)
    assert not skips
    assert dict(zip(frame["loinc"], frame["value"], strict=True)) == {"8480-6": 150.0,
                                                                      "8462-4": 95.0}
    assert set(frame["observation_id"]) == {"Observation/bp"}


def test_bad_observations_are_skipped_with_reasons(kg: KnowledgeGraph) -> None:
    bad = [
        obs("novalue", "2339-0", None),
        {**obs("str", "2339-0", None), "valueString": "high"},
        obs("unit", "2339-0", 5.0, "furlongs"),
        obs("code", "99999-9"),
        obs("date", "2339-0", when="yesterday-ish"),
        obs("future", "2339-0", when="2031-01-01T00:00:00Z"),
        {**obs("status", "2339-0"), "status": "entered-in-error"},
        obs("survey", "2339-0", category="survey"),
        obs("dup", "2339-0"), obs("dup", "2339-0"),
        {**obs("nodate", "2339-0"), "effectiveDateTime": None},
    ]
    frame, skips = build_lab_frame(bad, kg, now=NOW)
    assert list(frame["observation_id"]) == ["Observation/dup"]
    reasons = {s.reference.split("/")[1]: s.reason for s in skips}
    assert reasons["novalue"].endswith("no value")
    assert "valueString" in reasons["str"]
    assert "furlongs" in reasons["unit"]
    assert "99999-9" in reasons["code"]
    assert "malformed" in reasons["date"]
    assert "future" in reasons["future"]
    assert "entered-in-error" in reasons["status"]
    assert "laboratory" in reasons["survey"]
    assert "duplicate" in reasons["dup"]
    assert "date" in reasons["nodate"]


def test_resource_reference_range_wins_and_graph_fills_in(kg: KnowledgeGraph) -> None:
    own = obs("own", "2339-0", 100, referenceRange=[{"low": {"value": 3.0, "code": "mmol/L"},
                                                     "high": {"value": 6.0, "code": "mmol/L"}}])
    frame, _ = build_lab_frame([own, obs("graph", "2339-0", 100)], kg, now=NOW)
    by_id = frame.set_index("observation_id")
    assert by_id.loc["Observation/own", "ref_high"] == pytest.approx(108.1, abs=0.5)
    assert not math.isnan(by_id.loc["Observation/graph", "ref_high"])


def test_sex_specific_range_for_haemoglobin(kg: KnowledgeGraph) -> None:
    hb = [obs("hb", "718-7", 12.5, "g/dL")]
    male, _ = build_lab_frame(hb, kg, PatientContext("m", sex="male"), NOW)
    female, _ = build_lab_frame(hb, kg, PatientContext("f", sex="female"), NOW)
    assert male.iloc[0]["ref_low"] > female.iloc[0]["ref_low"]


def test_huge_series_is_bounded_in_time_and_size(kg: KnowledgeGraph) -> None:
    series = [obs(f"o{i}", "2339-0", 90 + i % 50,
                  when=f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:00:00Z")
              for i in range(50_000)]
    started = time.monotonic()
    frame, skips = build_lab_frame(series, kg, now=NOW)
    assert time.monotonic() - started < 60
    assert len(frame) == MAX_READINGS
    # The rest is not dropped silently: each older reading is a recorded skip with its reason.
    assert len(skips) == 50_000 - MAX_READINGS
    assert {s.reason for s in skips} == {f"older than the newest {MAX_READINGS} readings"}
    when = {f"Observation/{o['id']}": pd.Timestamp(o["effectiveDateTime"]) for o in series}
    assert frame["time"].min() >= max(when[s.reference] for s in skips)

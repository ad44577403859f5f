"""A reading dated where no timestamp reaches (1627, found by the reliability fuzzer) is a
recorded skip, not a crash of the worker."""

from __future__ import annotations

from datetime import UTC, datetime

from clinragen_fhir.encoding.labs import build_lab_frame
from clinragen_fhir.fhir.resources import to_utc
from clinragen_fhir.knowledge import load_graph


def observation(when: str) -> dict[str, object]:
    return {"resourceType": "Observation", "id": f"o-{when[:4]}", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                      "observation-category", "code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
            "subject": {"reference": "Patient/p"}, "effectiveDateTime": when,
            "valueQuantity": {"value": 7.1, "unit": "%", "system": "http://unitsofmeasure.org",
                              "code": "%"}}


def test_to_utc_gives_none_outside_the_timestamp_range() -> None:
    assert to_utc(datetime(1627, 4, 5, 5, 33, tzinfo=UTC)) is None
    assert to_utc("1627-04-05") is None and to_utc("2400-01-01") is None
    ts = to_utc("2024-03-01")
    assert ts is not None and ts.year == 2024


def test_a_reading_dated_1627_is_skipped_and_the_others_are_read() -> None:
    frame, skips = build_lab_frame([observation("1627-04-05T05:33:35Z"),
                                    observation("2024-03-01T00:00:00Z")], load_graph())
    assert list(frame["observation_id"]) == ["Observation/o-2024"]
    assert [(s.reference, s.reason) for s in skips] == [("Observation/o-1627", "no usable date")]

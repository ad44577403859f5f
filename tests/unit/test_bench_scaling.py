"""bench/scaling.py's logic (no timing): the synthetic patient goes through the real encoding
as the bench assumes, the growth slopes and the stage shares."""

from __future__ import annotations

import math

import pytest

from bench.scaling import (
    NOW,
    growth,
    pick_tests,
    stage_shares,
    synthetic_notes,
    synthetic_observations,
    synthetic_patient,
)


def test_growth_is_the_log_log_slope() -> None:
    sizes = [10, 100, 1000]
    assert growth(sizes, [1.0, 10.0, 100.0])[1:] == pytest.approx([1.0, 1.0])
    assert growth(sizes, [1.0, 1.0, 100.0])[1:] == pytest.approx([0.0, 2.0])
    assert growth(sizes, [2.0, 4.0, 8.0])[0] is None
    assert growth([10, 100], [0.0, 1.0]) == [None, None]


def test_stage_shares_take_the_inner_stages_out_of_the_predictor() -> None:
    s = stage_shares({"encode": 1.0, "predict (all)": 5.0, "retrieve": 1.0, "featurise": 0.5,
                      "model (prefix + decode)": 3.0, "rationale check": 0.2,
                      "report + Provenance": 0.3})
    assert s["predict (other)"] == pytest.approx(0.5)
    assert sum(s.values()) == pytest.approx(1.0 + 5.0 + 0.2 + 0.3)


def test_synthetic_observations_are_all_read_by_the_real_encoder() -> None:
    from clinragen_fhir.encoding.patient import encode_patient
    from clinragen_fhir.knowledge import load_graph

    kg = load_graph()
    tests = pick_tests(kg, [], 6)
    assert len(tests) == 6
    assert all(low < high for _, _, _, low, high, _ in tests)
    obs = synthetic_observations(60, tests)
    assert len({o["id"] for o in obs}) == 60
    times = [o["effectiveDateTime"] for o in obs]
    assert times == sorted(times) and times[-1] < NOW.isoformat()
    enc = encode_patient(synthetic_patient(), obs, synthetic_notes(), kg, NOW, patient_id="scale")
    assert len(enc.labs) == 60 and not enc.skips
    assert len(enc.notes) == 2
    assert set(enc.labs["loinc"]) == {t[0] for t in tests}
    # some readings out of range, most within (the bench's mix)
    out = ((enc.labs["value"] > enc.labs["ref_high"]) | (enc.labs["value"] < enc.labs["ref_low"]))
    assert 0 < int(out.sum()) < 30
    assert not math.isnan(float(enc.labs["value"].sum()))

"""Faithfulness: lab claims in a rationale checked against the patient's frame."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from clinragen_fhir.knowledge import KnowledgeGraph, load_graph
from tests.unit.train_examples import frame
from training.faithfulness import LabLexicon, check_rationale, extract_claims, summarise

T1, T2 = datetime(2024, 1, 10, tzinfo=UTC), datetime(2024, 3, 2, 9, 30, tzinfo=UTC)
LABS = frame([("4548-4", 6.8, T1), ("4548-4", 7.14, T2), ("2345-7", 92.0, T2),
              ("33914-3", 48.0, T2)])


@pytest.fixture(scope="module")
def kg() -> KnowledgeGraph:
    return load_graph()


@pytest.fixture(scope="module")
def lexicon(kg: KnowledgeGraph) -> LabLexicon:
    return LabLexicon.build(kg, [LABS])


def verdicts(text: str, lexicon: LabLexicon) -> list[tuple[bool, str]]:
    return [(c.matched, c.reason) for c in check_rationale(text, LABS, lexicon)]


def test_true_claims_match_with_written_precision(lexicon: LabLexicon) -> None:
    text = ("HbA1c was 7.1 % on 2024-03-02, rising from 6.8 % on 2024-01-10 (>= 6.5 %, "
            "ADA 2024); Hemoglobin A1c/Hemoglobin.total in Blood is high.")
    assert verdicts(text, lexicon) == [(True, "")] * 3


def test_wrong_value_wrong_date_and_missing_test_are_caught(lexicon: LabLexicon) -> None:
    assert verdicts("HbA1c was 8.1 % on 2024-03-02.", lexicon) == [(False, "value differs")]
    assert verdicts("HbA1c was 7.1 % on 2024-03-05.", lexicon) == \
        [(False, "no reading on that date")]
    # the value exists, but on the other date: value and date must hold for one reading
    assert verdicts("HbA1c 6.8 % on 2024-03-02", lexicon) == [(False, "value differs")]
    assert verdicts("Total cholesterol 250 mg/dL on 2024-03-02.", lexicon) == \
        [(False, "test not in the record")]


def test_direction_against_range_and_trend(lexicon: LabLexicon) -> None:
    assert verdicts("Glucose 92 mg/dL is high.", lexicon) == [(False, "not high")]
    assert verdicts("Glucose 92 mg/dL is normal.", lexicon) == [(True, "")]
    assert verdicts("eGFR (MDRD) 48 on 2024-03-02 is low", lexicon) == [(True, "")]
    assert verdicts("HbA1c is rising.", lexicon) == [(True, "")]
    assert verdicts("HbA1c is falling.", lexicon) == [(False, "not falling")]
    # a direction word in the previous clause does not leak into the next claim
    assert verdicts("HbA1c 7.1 % is high; Glucose 92 mg/dL on 2024-03-02.", lexicon) == \
        [(True, ""), (True, "")]


def test_units_codes_and_counts_are_not_values(lexicon: LabLexicon) -> None:
    claims = extract_claims("eGFR (MDRD) 48 mL/min/{1.73_m2} on 2024-03-02 (LOINC 33914-3, "
                            "3 readings, persisting >= 90 days).", lexicon)
    assert [(c.value, str(c.day)) for c in claims] == [(48.0, "2024-03-02")]
    assert extract_claims("Glucose was checked twice.", lexicon) == []


def test_summary_pools_claims(lexicon: LabLexicon) -> None:
    checks = [check_rationale(t, LABS, lexicon) for t in
              ("HbA1c 7.1 % on 2024-03-02.", "HbA1c 9 % on 2024-03-02.", "No labs cited.")]
    s = summarise(checks)
    assert (s.claims, s.matched, s.rationales, s.rationales_with_claims) == (2, 1, 3, 2)
    assert s.share == pytest.approx(0.5)


def test_numbers_inside_units_are_not_values(kg: KnowledgeGraph) -> None:
    labs = frame([("4548-4", 7.1, T2)])
    labs["display"] = "Erythrocytes in Blood"
    lex = LabLexicon.build(kg, [labs])
    claims = extract_claims("Erythrocytes in Blood was 7.1 10*6/uL on 2024-03-02 (low)", lex)
    assert [(c.value, str(c.day)) for c in claims] == [(7.1, "2024-03-02")]

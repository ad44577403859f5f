"""Faithfulness: lab claims in a rationale checked against the patient's frame."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from clinragen_fhir.knowledge import KnowledgeGraph, load_graph
from clinragen_fhir.report.faithfulness import (
    LabLexicon,
    check_rationale,
    extract_claims,
    summarise_claims,
)
from tests.unit.train_examples import frame

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
    s = summarise_claims(checks)
    assert (s.claims, s.matched, s.rationales, s.rationales_with_claims) == (2, 1, 3, 2)
    assert s.share == pytest.approx(0.5)


def test_numbers_inside_units_are_not_values(kg: KnowledgeGraph) -> None:
    labs = frame([("4548-4", 7.1, T2)])
    labs["display"] = "Erythrocytes in Blood"
    lex = LabLexicon.build(kg, [labs])
    claims = extract_claims("Erythrocytes in Blood was 7.1 10*6/uL on 2024-03-02 (low)", lex)
    assert [(c.value, str(c.day)) for c in claims] == [(7.1, "2024-03-02")]


def test_criteria_ranges_and_bounds_are_not_readings(lexicon: LabLexicon) -> None:
    """Thresholds, ranges and open bounds name a criterion; they are no claim about a reading."""
    for text in ("Glucose >= 126 mg/dL on two occasions.", "eGFR < 60 for >= 90 days.",
                 "Creatinine rise >= 0.3 mg/dL within 48 h.", "HbA1c between 5.7 and 6.4 %.",
                 "HbA1c 5.7\u20136.4 % is the prediabetic range.", "Glucose 100-125 mg/dL.",
                 "HbA1c exceeds the threshold of 6.5 %.", "eGFR consistent with stage 3.",
                 "Body mass index 30.0-39.9 suggests obesity.", "Body mass index 40+ - obese."):
        assert [c.value for c in extract_claims(text, lexicon)] == [], text
    # the reading cited after a criterion is still a claim, and a true one
    text = "Glucose >= 126 mg/dL on two occasions: Glucose 92 mg/dL on 2024-03-02."
    assert [(c.value, str(c.day)) for c in extract_claims(text, lexicon)] == \
        [(92.0, "2024-03-02")]
    assert verdicts(text, lexicon) == [(True, "")]


def test_finding_labels_and_disorder_names_with_numbers_are_not_claims(
        lexicon: LabLexicon) -> None:
    # "HbA1c normal" is the graph's label of the finding HbA1c < 5.7 %, not a statement
    text = "HbA1c normal: HbA1c 7.1 % on 2024-03-02, high (reference 4-5.7)."
    assert [(c.value, c.direction) for c in extract_claims(text, lexicon)] == [(7.1, "high")]
    assert verdicts(text, lexicon) == [(True, "")]
    text = "Chronic kidney disease stage 3 and type 2 diabetes; eGFR 48 on 2024-03-02."
    assert [c.value for c in extract_claims(text, lexicon)] == [48.0]
    assert verdicts(text, lexicon) == [(True, "")]


def test_a_direction_word_belongs_to_the_test_it_stands_next_to(lexicon: LabLexicon) -> None:
    assert verdicts("High HbA1c and normal glucose.", lexicon) == [(True, ""), (True, "")]
    claims = extract_claims("HbA1c 7.1 %, elevated glucose.", lexicon)
    assert [(c.value, c.direction) for c in claims] == [(7.1, None), (None, "high")]
    # glucose 92 mg/dL is inside 70-100: the wrong direction is caught on the right test
    assert verdicts("HbA1c 7.1 %, elevated glucose.", lexicon) == [(True, ""),
                                                                    (False, "not high")]


def test_digits_inside_count_units_are_not_values(kg: KnowledgeGraph) -> None:
    labs = frame([("4548-4", 7.2, T2), ("2345-7", 250.0, T2)])
    labs.loc[0, ["display", "unit", "raw_unit"]] = ["Leukocytes [#/volume] in Blood", "10*3/uL",
                                                    "10*3/uL"]
    labs.loc[1, ["display", "unit", "raw_unit"]] = ["Platelets [#/volume] in Blood", "10*3/uL",
                                                    "10*3/uL"]
    lex = LabLexicon.build(kg, [labs])
    text = ("Leukocytes 7.2 10*3/uL on 2024-03-02; Platelets [#/volume] in Blood 250 10*3/uL "
            "on 2024-03-02.")
    claims = extract_claims(text, lex)
    assert [(c.value, str(c.day)) for c in claims] == [(7.2, "2024-03-02"),
                                                       (250.0, "2024-03-02")]
    assert all(c.matched for c in check_rationale(text, labs, lex))

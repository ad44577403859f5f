"""training/gap.py: the conclusion-rule alternatives it compares decide the same codes and differ
only in which survive the cap; their macro-F1 (`classification_report`'s) counts only disorders
with a positive."""

from __future__ import annotations

import numpy as np

from clinragen_fhir.knowledge import load_graph
from tests.unit.train_examples import make_examples
from training.example import label_matrix
from training.gap import rule_variants
from training.metrics import classification_report
from training.vocabulary import revealable_disorders


def test_macro_f1_counts_disorders_with_a_positive() -> None:
    y = np.array([[1, 0, 0], [0, 1, 0]])
    codes = ["a", "b", "c"]
    assert classification_report(y, y, y, codes).macro_f1 == 1.0
    assert classification_report(y, np.array([[1, 0, 1], [0, 0, 0]]), y, codes).macro_f1 == 0.5


def test_rule_variants_differ_only_where_the_cap_binds() -> None:
    kg = load_graph()
    disorders = sorted(revealable_disorders(kg))
    examples = make_examples(12)
    y = label_matrix(examples, disorders)
    rng = np.random.default_rng(0)
    # leaves only: no code is a parent of another, so the most-specific rule drops none
    leaves = [j for j, d in enumerate(disorders)
              if not any(d in kg.ancestors(o) for o in disorders)]
    probs = np.zeros((len(examples), len(disorders)))
    for i in range(len(examples)):
        probs[i, rng.choice(leaves, 2, replace=False)] = 0.9
    two = rule_variants(kg, probs, disorders, examples, (0.5, {}, {}), y)
    assert len({round(v["macro_f1"], 9) for v in two.values()}) == 1  # 2 codes: no cap binds
    for i in range(len(examples)):
        probs[i, rng.choice(leaves, 3, replace=False)] = rng.uniform(0.6, 0.95, 3)
    rates = dict(zip(disorders, rng.uniform(0.01, 0.6, len(disorders)), strict=True))
    many = rule_variants(kg, probs, disorders, examples,
                         (0.5, {disorders[leaves[0]]: 0.7}, rates), y)
    assert many["cap 3, by probability"]["codes_per_report"] <= 3.0
    assert many["cap 5, by probability"]["codes_per_report"] > \
        many["cap 3, by probability"]["codes_per_report"]
    # the lift keeps as many codes, other ones
    assert many["cap 3, by lift"]["codes_per_report"] == \
        many["cap 3, by probability"]["codes_per_report"]
    from training.baselines import decide
    assert (decide(kg, probs, disorders, examples, 0.5, None, 3, rates)[0]
            != decide(kg, probs, disorders, examples, 0.5, None, 3)[0]).any()
    # only codes with a supporting reading: every concluded code has one
    only = many["cap 3, by lift, only with a reading"]
    assert only["with_a_reading"] == 1.0 or np.isnan(only["with_a_reading"])
    assert only["codes_per_report"] <= many["cap 3, by lift"]["codes_per_report"]


def test_with_a_reading_marks_the_readings_a_line_may_cite() -> None:
    """A record has a reading for a disorder when one of its values is evidence for it (what a
    rationale line may cite): an HbA1c of 7.0 % for type 2 diabetes, not one of 5.2 %, and never
    a blood pressure."""
    from training.gap import with_a_reading

    kg = load_graph()
    examples = make_examples(6)
    examples[0].labs = examples[0].labs.iloc[0:0]  # a record without readings
    assert not with_a_reading(kg, examples[:1], ["44054006"])[0, 0]
    with_a1c = [ex for ex in examples if "4548-4" in set(ex.labs["loinc"])]
    assert with_a1c
    for value, marked in ((7.0, True), (5.2, False)):
        ex = with_a1c[0]
        labs = ex.labs[ex.labs["loinc"] == "4548-4"].copy()
        labs["value"] = value
        ex.labs = labs
        assert with_a_reading(kg, [ex], ["44054006"])[0, 0] == marked, value
    only_bp = examples[1]
    only_bp.labs = only_bp.labs[only_bp.labs["loinc"].isin(["8480-6", "8462-4"])]
    assert not with_a_reading(kg, [only_bp], ["44054006"])[0, 0]  # blood pressure does not


def test_text_probe_scores_labs_notes_and_both_per_code() -> None:
    from training.gap import text_probe

    examples = make_examples(40)
    out = text_probe(examples[:30], examples[30:], ["44054006", "709044004", "0"], seed=7)
    assert set(out) == {"44054006", "709044004"}  # a code without positives is left out
    for scores in out.values():
        assert set(scores) == {"labs", "notes", "both"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert out["44054006"]["labs"] > 0.9  # diabetes is in the HbA1c the examples carry


def test_paired_difference_is_zero_for_the_same_system_and_positive_for_a_better_one() -> None:
    from training.gap import paired

    kg = load_graph()
    disorders = sorted(revealable_disorders(kg))
    examples = make_examples(30)
    y = label_matrix(examples, disorders)
    rule = (0.5, {}, {})
    truth = y * 0.9  # concludes what the labels say (leaves and ancestors alike)
    same = paired(kg, truth, truth, (rule, rule), disorders, examples, y, seed=1)
    assert same["slm"] == same["boosting"] and same["diff_low"] == same["diff_high"] == 0.0
    noise = np.random.default_rng(0).uniform(0, 1, y.shape)
    better = paired(kg, truth, noise, (rule, rule), disorders, examples, y, seed=1)
    assert better["slm"] > better["boosting"] and better["diff_low"] > 0
    assert better["p_better"] == 1.0

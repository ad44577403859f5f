"""The release gate (training/gate.py) on hand-written results: a model below the rule baseline
on the external cohort, one that concludes too many codes, or one evaluated without an external
cohort is refused with the failing number and its limit; every check is recorded."""

from __future__ import annotations

from tests.unit.release_results import FULL, RULE, hand_results
from training.gate import GOAL_CODES_PER_REPORT, check_release


def test_a_model_above_the_rule_baseline_within_the_codes_goal_passes() -> None:
    gate = check_release(hand_results(), FULL)
    assert gate.passed and gate.reason() == "" and not gate.failures
    assert [c.name for c in gate.checks] == ["external_cohort", "external_macro_f1_vs_rule",
                                             "external_codes_per_report",
                                             "internal_codes_per_report"]
    f1 = gate.checks[1]
    assert (f1.value, f1.limit, f1.relation) == (0.4, 0.3, ">=")
    assert f1.message == "external macro-F1 0.400 >= rule baseline 0.300"
    js = gate.to_json()
    assert js["verdict"] == "pass" and js["passed"] and js["system"] == FULL
    assert js["goal_codes_per_report"] == GOAL_CODES_PER_REPORT == 3.0
    assert js["checks"][2] == {"name": "external_codes_per_report", "cohort": "external",
                               "value": 1.6, "limit": 3.0, "relation": "<=", "passed": True,
                               "message": "external codes per report 1.60 <= goal 3.00"}


def test_below_the_rule_baseline_on_the_external_cohort_is_refused() -> None:
    gate = check_release(hand_results(external_f1=0.21, external_rule=0.29), FULL)
    assert not gate.passed and [c.name for c in gate.failures] == ["external_macro_f1_vs_rule"]
    assert "external macro-F1 0.210 < rule baseline 0.290" in gate.reason()
    assert gate.to_json()["verdict"] == "refused"
    # equal is not below; numbers that round alike are shown with the digits that differ
    assert check_release(hand_results(external_f1=0.29, external_rule=0.29), FULL).passed
    close = check_release(hand_results(external_f1=0.2901, external_rule=0.2904), FULL)
    assert "external macro-F1 0.2901 < rule baseline 0.2904" in close.reason()


def test_too_many_codes_per_report_is_refused_on_either_cohort() -> None:
    ext = check_release(hand_results(external_codes=3.4), FULL)
    assert [c.name for c in ext.failures] == ["external_codes_per_report"]
    assert "external codes per report 3.40 > goal 3.00" in ext.reason()
    internal = check_release(hand_results(internal_codes=3.2), FULL)
    assert [c.name for c in internal.failures] == ["internal_codes_per_report"]
    assert "internal codes per report 3.20 > goal 3.00" in internal.reason()
    assert check_release(hand_results(internal_codes=3.0, external_codes=3.0), FULL).passed
    both = check_release(hand_results(external_f1=0.1, internal_codes=3.5), FULL)
    assert len(both.failures) == 2 and "0.100 < rule baseline 0.300" in both.reason() \
        and "internal codes per report 3.50 > goal 3.00" in both.reason()
    assert check_release(hand_results(external_codes=2.5), FULL, goal_codes_per_report=2.0
                         ).reason().endswith("external codes per report 2.50 > goal 2.00")


def test_results_without_an_external_cohort_are_refused() -> None:
    gate = check_release(hand_results(external=False), FULL)
    assert [c.name for c in gate.failures] == ["external_cohort"]
    assert "no external cohort" in gate.reason()
    assert [c.name for c in gate.checks] == ["external_cohort", "internal_codes_per_report"]
    empty = hand_results()
    empty["external"] = {"test_examples": 0, "systems": []}
    assert not check_release(empty, FULL).passed


def test_a_missing_row_or_value_is_refused_not_passed() -> None:
    res = hand_results()
    res["external"]["systems"] = [r for r in res["external"]["systems"] if r["system"] != RULE]
    assert "no row for 'rule baseline'" in check_release(res, FULL).reason()
    assert "no row for 'SLM other'" in check_release(hand_results(), "SLM other").reason()
    nan = check_release(hand_results(external_f1=float("nan")), FULL)
    assert [c.name for c in nan.failures] == ["external_macro_f1_vs_rule"]
    assert "external macro-F1 n/a vs rule baseline 0.300" in nan.reason()

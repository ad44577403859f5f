"""Small hand-written results.json dicts in the shape `training.evaluate.evaluate` writes
(internal cohort at the top level, `external` beside it), for the release gate and metrics.json."""

from __future__ import annotations

from typing import Any

FULL = "ClinRaGen SLM (full: staged + knowledge)"
RULE = "rule baseline"
LOGREG = "logistic regression (labs + TF-IDF)"
BOOSTING = "gradient boosting (labs + TF-IDF)"
NAN = float("nan")


def row(system: str, kind: str, f1: float, codes: float = 1.2,
        reference: str = LOGREG) -> dict[str, Any]:
    ci: dict[str, float] = {"low": f1 - 0.1, "high": f1 + 0.1}
    if system != reference:
        ci.update(diff_low=-0.05, diff_high=0.08, p_better=0.6)
    out: dict[str, Any] = {
        "system": system, "rationale_kind": kind, "macro_f1_revealable": f1,
        "macro_f1_revealable20": f1 - 0.05, "macro_f1_ci": ci, "bootstrap_reference": reference,
        "micro_precision": 0.8, "micro_recall": 0.4, "new_recall": NAN,
        "codes_per_report": codes, "abstention_rate": 0.1,
        "rouge_l": 12.5 if kind == "generated" else NAN,
        "micro_f1": 0.3, "per_disorder_f1": {"44054006": f1},  # columns metrics.json leaves out
        "faithfulness": 1.0, "claims": 12}
    if kind == "generated":
        out.update(diagnoses=10, diagnoses_cited=9, diagnoses_cited_share=0.9,
                   diagnosis_claims=20, diagnosis_claims_held=0.95)
    return out


def cohort(full_f1: float, rule_f1: float, codes: float, patients: int) -> dict[str, Any]:
    return {"test_examples": 2 * patients, "test_patients": patients, "revealable_in_macro": 5,
            "revealable_positives": 30, "new_positives": 4, "revealable20": ["44054006"],
            "systems": [row(RULE, "rule", rule_f1, 1.0), row(LOGREG, "template", 0.35),
                        row(BOOSTING, "template", 0.3), row(FULL, "generated", full_f1, codes)]}


def hand_results(external_f1: float = 0.4, external_rule: float = 0.3,
                 internal_codes: float = 1.5, external_codes: float = 1.6,
                 external: bool = True) -> dict[str, Any]:
    """A run the gate passes by default; each argument makes one check fail."""
    out: dict[str, Any] = {
        "config": "t", "backbone": "tiny", "vocabulary": "all", "train_examples": 10,
        "valid_examples": 3, "train_patients": 10, **cohort(0.45, 0.3, internal_codes, 3),
        "timings_s": {"train full": 12.5, "evaluate": 3.0, "total": 40.0}}
    if external:
        out["external"] = cohort(external_f1, external_rule, external_codes, 7)
    return out

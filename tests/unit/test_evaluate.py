"""Evaluation: baselines on synthetic patients, the table, and the end-to-end quick path."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clinragen_fhir.knowledge import KnowledgeGraph, load_graph
from clinragen_fhir.predict.diagnosis_line import uncertain_band
from clinragen_fhir.report.faithfulness import LabLexicon
from tests.unit.train_examples import CKD, DM2, HTN, make_examples
from training.baselines import (
    FeatureClassifier,
    SystemOutput,
    rule_outputs,
    template_rationale,
)
from training.evaluate import markdown_table, score
from training.example import label_matrix
from training.vocabulary import revealable_disorders

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kg() -> KnowledgeGraph:
    return load_graph()


def test_rule_baseline_finds_the_lab_disorders_and_its_claims_are_faithful(
        kg: KnowledgeGraph) -> None:
    examples = make_examples(15)
    disorders = sorted(kg.disorders())
    out = rule_outputs(kg, examples, disorders)
    y = label_matrix(examples, disorders)
    dm2 = disorders.index(DM2)
    # every synthetic diabetic has HbA1c >= 6.5 on repeated readings: the rules must catch them
    assert (out.pred[y[:, dm2] == 1, dm2] == 1).all()
    assert out.probs.min() >= 0 and out.probs.max() <= 1
    lexicon = LabLexicon.build(kg, [e.labs for e in examples])
    row = score(out, y, disorders, y.sum(0) > 0, examples, lexicon)
    assert row["claims"] > 0 and row["faithfulness"] == pytest.approx(1.0)
    assert row["rationale_kind"] == "rule"


def test_feature_classifiers_learn_the_synthetic_signal(kg: KnowledgeGraph) -> None:
    examples = make_examples(60, seed=1)
    train = [e for e in examples if e.split == "train"]
    valid = [e for e in examples if e.split == "valid"]
    test = [e for e in examples if e.split == "test"]
    disorders = [DM2, CKD, HTN]
    for kind in ("logistic", "boosting"):
        clf = FeatureClassifier(kind).fit(train, valid, disorders)
        out = clf.outputs(test, kg, 0.6)
        y = label_matrix(test, disorders)
        lexicon = LabLexicon.build(kg, [e.labs for e in examples])
        row = score(out, y, disorders, np.ones(3, bool), test, lexicon)
        assert row["macro_f1"] >= 0.8, (kind, row["macro_f1"])
        assert row["macro_auroc"] >= 0.9
        assert row["rationale_kind"] == "template" and row["faithfulness"] == 1.0


def test_template_rationale_cites_abnormal_readings_only() -> None:
    ex = make_examples(3)[0]  # diabetic: HbA1c and glucose high
    text = template_rationale(ex, [(DM2, "Diabetes mellitus type 2")])
    assert "Hemoglobin A1c" in text and "(high)" in text and "Diabetes" in text
    assert "Systolic" not in text  # normal: not cited


def test_markdown_table_marks_template_faithfulness_and_missing_values() -> None:
    base = {"macro_f1_revealable": 0.25, "macro_f1_revealable20": float("nan"),
            "micro_precision": 0.8, "micro_recall": 0.5, "new_recall": float("nan"),
            "macro_auroc_revealable": 0.75, "codes_per_report": 1.5, "abstention_rate": 0.0,
            "rouge_l": 2.0, "faithfulness": 1.0, "claims": 3}
    rows = [{"system": "a", "rationale_kind": "template", **base,
             "macro_f1_ci": {"low": 0.1, "high": 0.4}},
            {"system": "b", "rationale_kind": "generated", **base, "diagnoses": 4,
             "diagnoses_cited": 3, "diagnoses_cited_share": 0.75, "diagnosis_claims": 5,
             "diagnosis_claims_held": 1.0,
             "macro_f1_ci": {"low": 0.1, "high": 0.4, "diff_low": -0.05, "diff_high": 0.02}}]
    cohort = {"systems": rows, "test_examples": 4, "test_patients": 2, "sources": ["s"],
              "revealable_in_macro": 2, "revealable_positives": 3, "new_positives": 1,
              "revealable20": []}
    md = markdown_table({**cohort, "train_examples": 8, "valid_examples": 2,
                         "backbone": "tiny", "config": "quick", "external": cohort})
    assert "| a | 0.250 [0.100, 0.400] | reference | n/a | 0.800 | 0.500 | n/a | 0.750 | " \
        "1.50 | 0.0 % | n/a | 100.0 % (3) by construction | 2.0 | template |" in md
    assert "| b | 0.250 [0.100, 0.400] | [-0.050, +0.020] |" in md
    assert "| 75.0 % (3/4) | 100.0 % (5) |" in md  # diagnoses with a claim, claims that hold
    assert "(b) = the 2 revealable disorders with a positive here (3 positives, 1 of them new" \
        in md
    assert md.count("| system |") == 2 and "External test" in md


def test_revealable_set_is_what_lab_findings_support(kg: KnowledgeGraph) -> None:
    shown = revealable_disorders(kg)
    assert {DM2, CKD, HTN} <= shown  # HbA1c, eGFR, blood pressure findings support them
    assert "66383009" not in shown and "40055000" not in shown  # gingivitis, chronic sinusitis
    assert "44465007" not in shown  # sprain of ankle: no lab reveals it
    assert len(shown) < len(kg.disorders()) / 2


def test_columns_a_and_b_count_only_disorders_with_a_test_positive() -> None:
    disorders = ["d1", "d2", "d3", "d4"]  # d4: nobody has it
    y = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]])
    pred = np.array([[1, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]])
    out = SystemOutput("s", pred.astype(float), pred, [False] * 4, [""] * 4, "template")
    row = score(out, y, disorders, np.ones(4, bool), make_examples(4), LabLexicon({}),
                revealable=np.array([True, True, False, True]))
    # (a) d1..d3: F1 2/3, 0, 1 -> macro 5/9; micro tp=2 fp=0 fn=2 (d4's false positives are
    # not in a column with a positive) -> 2tp/(2tp+fp+fn) = 4/6
    assert row["macro_f1"] == pytest.approx(5 / 9) and row["micro_f1"] == pytest.approx(4 / 6)
    # (b) d1, d2 (d4 revealable but absent): macro 1/3, micro tp=1 fn=2 -> 2/4
    assert row["macro_f1_revealable"] == pytest.approx(1 / 3)
    assert row["micro_f1_revealable"] == pytest.approx(0.5)
    # the vocabulary-wide micro-F1 keeps d4's two false positives: 4/(4+2+2)
    assert row["micro_f1_vocabulary"] == pytest.approx(0.5)


def test_every_system_abstains_by_the_same_rule(kg: KnowledgeGraph) -> None:
    examples = make_examples(60, seed=1)
    train = [e for e in examples if e.split == "train"]
    valid = [e for e in examples if e.split == "valid"]
    test = [e for e in examples if e.split == "test"]
    clf = FeatureClassifier("logistic").fit(train, valid, [DM2, CKD, HTN])
    out = clf.outputs(test, kg, 0.6)
    low, high = uncertain_band(clf.threshold, 0.6)
    top = out.probs.max(1)
    assert out.abstained == [bool(low <= t < high) for t in top]
    rules = rule_outputs(kg, test, [DM2, CKD, HTN])
    rtop = rules.probs.max(1)
    rlow, rhigh = uncertain_band(0.5, 0.6)
    assert rules.abstained == [bool(rlow <= t < rhigh) for t in rtop]


@pytest.mark.slow
def test_quick_reproduce_end_to_end(tmp_path: Path) -> None:
    """`clinragen-train reproduce --quick`: real shared data, teacher, 3 variants, the table."""
    out = tmp_path / "train"
    proc = subprocess.run([sys.executable, "-m", "training.cli", "reproduce", "--quick",
                           "--out", str(out), "--no-doc"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "quick" / "results.json").read_text())
    systems = [r["system"] for r in results["systems"]]
    assert len(systems) == 6 and systems[0] == "rule baseline"
    assert any("without knowledge" in s for s in systems)
    assert any("without staged" in s for s in systems)
    assert 0 <= results["revealable_in_macro"] <= results["disorders_in_macro"]
    for r in results["systems"]:
        assert 0 <= r["macro_f1"] <= 1 and 0 <= r["abstention_rate"] <= 1
        assert 0 <= r["micro_f1_vocabulary"] <= 1
        assert math.isnan(r["macro_f1_revealable"]) == (results["revealable_in_macro"] == 0)
        assert r["claims"] == 0 or 0 <= r["faithfulness"] <= 1
        assert not math.isnan(r["rouge_l"])
    assert (out / "quick" / "per_disorder_f1.png").stat().st_size > 1000
    assert (out / "quick" / "per_disorder_f1_all.png").stat().st_size > 1000
    assert (out / "results.md").read_text().count("\n|") >= 7
    model_dir = out / "quick" / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "MODEL_CARD.md").is_file()
    assert (out / "quick" / "full" / "losses.png").is_file()

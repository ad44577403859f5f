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
from tests.unit.train_examples import CKD, DM2, HTN, make_examples
from training.baselines import FeatureClassifier, label_matrix, rule_outputs, template_rationale
from training.evaluate import markdown_table, score
from training.faithfulness import LabLexicon

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
    rows = [{"system": "a", "rationale_kind": "template", "micro_f1": 0.5, "macro_f1": 0.25,
             "macro_auroc": float("nan"), "ece": 0.1, "abstention_rate": 0.0, "bleu4": 1.0,
             "rouge_l": 2.0, "faithfulness": 1.0, "claims": 3}]
    md = markdown_table({"systems": rows, "test_examples": 4, "test_patients": 2,
                         "train_examples": 8, "valid_examples": 2, "disorders_in_macro": 1,
                         "backbone": "tiny", "config": "quick"})
    assert "| a | 0.500 | 0.250 | n/a | 0.100 | 0.0 % | 1.0 | 2.0 | 100.0 % (3) by construction" \
        in md


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
    for r in results["systems"]:
        assert 0 <= r["macro_f1"] <= 1 and 0 <= r["abstention_rate"] <= 1
        assert r["claims"] == 0 or 0 <= r["faithfulness"] <= 1
        assert not math.isnan(r["rouge_l"])
    assert (out / "quick" / "per_disorder_f1.png").stat().st_size > 1000
    assert (out / "results.md").read_text().count("\n|") >= 7
    model_dir = out / "quick" / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "MODEL_CARD.md").is_file()
    assert (out / "quick" / "full" / "losses.png").is_file()

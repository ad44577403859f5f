"""Metrics on inputs whose answers are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import (
    auroc,
    base_rates,
    bleu4,
    classification_report,
    expected_calibration_error,
    f1_counts,
    rouge_l,
    tune_threshold,
)


def test_f1_micro_macro_by_hand() -> None:
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
    pred = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0], [0, 0, 0]])
    rep = classification_report(y, pred, pred.astype(float), ["a", "b", "c"])
    # a: tp1 fn1 -> 2/3; b: tp1 fn1 -> 2/3; c has no positive: not in macro, its fp in micro
    assert rep.per_disorder_f1 == pytest.approx({"a": 2 / 3, "b": 2 / 3})
    assert rep.macro_f1 == pytest.approx(2 / 3)
    assert rep.micro_f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
    assert rep.support == {"a": 2, "b": 2}
    assert f1_counts(0, 0, 0) == 0.0


def test_auroc_matches_pairs_and_ties() -> None:
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auroc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert math.isnan(auroc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_ece_perfect_and_overconfident() -> None:
    y = np.array([1, 0, 1, 0])
    assert expected_calibration_error(y, y.astype(float)) == pytest.approx(0.0)
    # everything at 0.9, half true: |0.9 - 0.5| in the one bin
    assert expected_calibration_error(y, np.full(4, 0.9)) == pytest.approx(0.4)


def test_threshold_tuning_finds_the_separating_cut() -> None:
    y = np.array([[1], [1], [0], [0]])
    prob = np.array([[0.3], [0.25], [0.1], [0.05]])
    t = tune_threshold(y, prob)
    assert 0.1 < t <= 0.25
    assert tune_threshold(np.zeros((3, 1), int), np.zeros((3, 1))) == 0.5


def test_bleu_and_rouge_identity_and_disjoint() -> None:
    ref = ["HbA1c was 7.1 % on 2024-03-02 which is above the threshold"]
    assert bleu4(ref, ref) == pytest.approx(100.0)
    assert rouge_l(ref, ref) == pytest.approx(100.0)
    assert bleu4(["completely different words here now"], ref) < 5.0
    assert rouge_l(["completely different words"], ref) == pytest.approx(0.0)
    half = rouge_l(["HbA1c was 7.1 %"], ref)
    assert 0 < half < 100


def test_bootstrap_intervals_are_over_patients_and_paired() -> None:
    from training.metrics import bootstrap_macro_f1

    rng = np.random.default_rng(0)
    y = (rng.random((60, 4)) < 0.3).astype(int)
    y[0] = 1  # every disorder has a positive
    noisy = np.where(rng.random(y.shape) < 0.25, 1 - y, y)
    groups = [f"p{i // 3}" for i in range(60)]  # 20 patients, 3 examples each
    out = bootstrap_macro_f1(y, {"oracle": y, "noisy": noisy, "same": noisy.copy()}, groups,
                             reference="noisy", n=200, seed=1)
    assert out["oracle"]["low"] == out["oracle"]["high"] == 1.0
    assert out["oracle"]["p_better"] == 1.0 and out["oracle"]["diff_low"] > 0
    assert out["noisy"]["low"] < out["noisy"]["high"] < 1.0 and "p_better" not in out["noisy"]
    assert out["same"]["p_better"] == 0.0
    assert out["same"]["diff_low"] == out["same"]["diff_high"] == 0
    again = bootstrap_macro_f1(y, {"noisy": noisy}, groups, n=200, seed=1)
    assert again["noisy"] == {k: out["noisy"][k] for k in ("low", "high")}  # seeded


def test_base_rates_are_each_codes_share_of_the_examples() -> None:
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert base_rates(y, ["a", "b", "c"]) == {"a": 0.75, "b": 0.25, "c": 0.0}
    assert base_rates(np.zeros((0, 3)), ["a", "b", "c"]) == {}


def test_thresholds_for_a_precision_operating_point() -> None:
    """Per disorder: the best F1 among thresholds with precision >= 0.8; a disorder nothing
    recognises at even half that precision is never concluded (not concluded at the grid's
    first threshold)."""
    from training.metrics import NEVER, tune_thresholds

    rng = np.random.default_rng(0)
    y = (rng.random((600, 3)) < 0.2).astype(int)
    p = np.clip(y * 0.6 + rng.random((600, 3)) * 0.5, 0, 1)  # a, b: separable above 0.5
    p[:, 2] = rng.random(600)  # c: noise
    _, per = tune_thresholds(y, p, ["a", "b", "c"], min_precision=0.8)
    for j, code in enumerate("ab"):
        pred = p[:, j] >= per[code]
        assert (y[pred, j] == 1).mean() >= 0.8 and pred.sum() > 0
    assert per["c"] == NEVER and not (p[:, 2] >= NEVER).any()
    # rarer than min_positives: left to the global threshold
    y_rare = y.copy()
    y_rare[:, 1] = 0
    y_rare[:3, 1] = 1
    assert "b" not in tune_thresholds(y_rare, p, ["a", "b", "c"], min_positives=5)[1]

"""Classification, calibration and text-overlap metrics for the comparison table.

Multi-label throughout: `y` and `pred` are [n_examples, n_disorders] 0/1 arrays, `prob` the
matching probabilities. Macro averages run over the disorders that have at least one positive in
the evaluated split (a disorder nobody has gives no F1 to average; its false positives still count
in micro-F1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassificationReport:
    micro_f1: float
    macro_f1: float
    macro_auroc: float  # NaN when no disorder has both classes
    ece: float
    per_disorder_f1: dict[str, float]
    per_disorder_auroc: dict[str, float]
    support: dict[str, int]


def f1_counts(tp: float, fp: float, fn: float) -> float:
    """F1 from counts; 0 when there is nothing to find and nothing was predicted wrongly."""
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom > 0 else 0.0


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUROC with ties counted half; NaN when only one class is present."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(score, dtype=float)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, bins: int = 10) -> float:
    """ECE over all (example, disorder) decisions: sum over equal-width bins of
    |mean probability - observed frequency| weighted by the bin's share."""
    y = np.asarray(y, dtype=float).ravel()
    p = np.clip(np.asarray(prob, dtype=float).ravel(), 0.0, 1.0)
    if len(p) == 0:
        return float("nan")
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(p[sel].mean() - y[sel].mean())
    return float(total)


def classification_report(y: np.ndarray, pred: np.ndarray, prob: np.ndarray,
                          disorders: Sequence[str]) -> ClassificationReport:
    """Per-disorder F1/AUROC, micro and macro F1, macro AUROC and ECE (over `disorders`)."""
    y = np.asarray(y, dtype=int)
    pred = np.asarray(pred, dtype=int)
    prob = np.asarray(prob, dtype=float)
    tp = (y & pred).sum(0)
    fp = ((1 - y) & pred).sum(0)
    fn = (y & (1 - pred)).sum(0)
    present = y.sum(0) > 0
    per_f1 = {d: f1_counts(tp[j], fp[j], fn[j]) for j, d in enumerate(disorders) if present[j]}
    per_auc = {d: auroc(y[:, j], prob[:, j]) for j, d in enumerate(disorders) if present[j]}
    aucs = [a for a in per_auc.values() if np.isfinite(a)]
    return ClassificationReport(
        micro_f1=f1_counts(tp.sum(), fp.sum(), fn.sum()),
        macro_f1=float(np.mean(list(per_f1.values()))) if per_f1 else float("nan"),
        macro_auroc=float(np.mean(aucs)) if aucs else float("nan"),
        ece=expected_calibration_error(y, prob),
        per_disorder_f1=per_f1, per_disorder_auroc=per_auc,
        support={d: int(y[:, j].sum()) for j, d in enumerate(disorders) if present[j]})


def tune_threshold(y: np.ndarray, prob: np.ndarray,
                   grid: Sequence[float] = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2))
                   ) -> float:
    """The global decision threshold with the best macro-F1 on held-out (validation) data; 0.5
    when the split has no positives to tune on. Every learned system gets the same treatment."""
    y = np.asarray(y, dtype=int)
    if y.sum() == 0:
        return 0.5
    present = y.sum(0) > 0
    best, best_t = -1.0, 0.5
    for t in grid:
        pred = (prob >= t).astype(int)
        tp = (y & pred).sum(0)[present]
        fp = ((1 - y) & pred).sum(0)[present]
        fn = (y & (1 - pred)).sum(0)[present]
        score = float(np.mean([f1_counts(a, b, c) for a, b, c in zip(tp, fp, fn, strict=True)]))
        if score > best + 1e-12:
            best, best_t = score, float(t)
    return best_t


def base_rates(y: np.ndarray, codes: Sequence[str]) -> dict[str, float]:
    """Each code's share of the (training) examples that have it: the prior against which the
    conclusion rule measures a probability's lift (`predict.conclude`). Every learned system's
    are taken from its own training split."""
    y = np.asarray(y, dtype=float)
    if len(y) == 0:
        return {}
    return {c: float(r) for c, r in zip(codes, y.mean(0), strict=True)}


NEVER = 1.01  # a threshold no probability reaches


def tune_thresholds(y: np.ndarray, prob: np.ndarray, codes: Sequence[str],
                    min_precision: float = 0.8, min_positives: int = 5,
                    grid: Sequence[float] = tuple(np.round(np.arange(0.05, 0.99, 0.01), 2))
                    ) -> tuple[float, dict[str, float]]:
    """(global threshold, per-disorder thresholds) for a precision operating point, on
    validation data. Per disorder with at least `min_positives` positives: the threshold with the
    best F1 among those whose precision reaches `min_precision`; when none reaches it, the best
    F0.5 (precision weighted) among those reaching half of it; else `NEVER` (the system cannot
    recognise the disorder at a usable precision: concluding it would add false positives).
    Rarer disorders use the global threshold: the best micro-F1 among thresholds whose pooled
    precision reaches `min_precision` (else the best pooled F0.5).
    Every learned system gets the same treatment."""
    y = np.asarray(y, dtype=int)
    grid_a = np.asarray(grid, dtype=float)
    pred = prob[None, :, :] >= grid_a[:, None, None]  # [G, N, D]
    tp = (pred & (y[None] == 1)).sum(1).astype(float)  # [G, D]
    fp = (pred & (y[None] == 0)).sum(1).astype(float)
    fn = ((~pred) & (y[None] == 1)).sum(1).astype(float)

    def pick(tp_: np.ndarray, fp_: np.ndarray, fn_: np.ndarray) -> float:
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(tp_ + fp_ > 0, tp_ / (tp_ + fp_), 0.0)
            f1 = np.where(tp_ > 0, 2 * tp_ / (2 * tp_ + fp_ + fn_), 0.0)
            f05 = np.where(tp_ > 0, 1.25 * tp_ / (1.25 * tp_ + fp_ + 0.25 * fn_), 0.0)
        ok = (precision >= min_precision) & (tp_ > 0)
        fallback = (precision >= min_precision / 2) & (tp_ > 0)
        score = np.where(ok, f1, -1.0) if ok.any() else np.where(fallback, f05, -1.0)
        if score.max() <= 0:  # no threshold is even half as precise: never conclude it
            return NEVER
        return float(grid_a[int(np.argmax(score))])

    if y.sum() == 0:
        return 0.5, {}
    overall = pick(tp.sum(1), fp.sum(1), fn.sum(1))
    per = {str(code): pick(tp[:, j], fp[:, j], fn[:, j])
           for j, code in enumerate(codes) if y[:, j].sum() >= min_positives}
    return overall, per


# ---------------------------------------------------------------------------------------------
# rationale overlap with the teacher


def bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (sacrebleu, 13a tokenisation), 0-100."""
    import sacrebleu

    if not hypotheses:
        return float("nan")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, no stemming), 0-100."""
    from rouge_score import rouge_scorer

    if not hypotheses:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, h)["rougeL"].fmeasure for h, r in
              zip(hypotheses, references, strict=True)]
    return 100.0 * float(np.mean(scores))


def bootstrap_macro_f1(y: np.ndarray, preds: dict[str, np.ndarray], groups: Sequence[str],
                       reference: str | None = None, n: int = 1000, seed: int = 0
                       ) -> dict[str, dict[str, float]]:
    """Macro-F1 with a 95% interval from resampling *patients* (all of a patient's examples go
    together), paired across systems: every system is scored on the same resamples, so the
    difference to `reference` has its own interval and `p_better` (share of resamples where the
    system beats the reference). Macro over the disorders with a positive in each resample."""
    y = np.asarray(y, dtype=int)
    ids = sorted(set(groups))
    rows = {g: [i for i, x in enumerate(groups) if x == g] for g in ids}
    rng = np.random.default_rng(seed)

    def macro(pred: np.ndarray, idx: np.ndarray) -> float:
        yy, pp = y[idx], np.asarray(pred, dtype=int)[idx]
        tp, fp, fn = (yy & pp).sum(0), ((1 - yy) & pp).sum(0), (yy & (1 - pp)).sum(0)
        present = yy.sum(0) > 0
        if not present.any():
            return float("nan")
        return float(np.mean([f1_counts(tp[j], fp[j], fn[j]) for j in np.flatnonzero(present)]))

    draws: dict[str, list[float]] = {k: [] for k in preds}
    for _ in range(n):
        picked = rng.choice(len(ids), size=len(ids), replace=True)
        idx = np.array([i for p in picked for i in rows[ids[p]]])
        for k, pred in preds.items():
            draws[k].append(macro(pred, idx))
    out: dict[str, dict[str, float]] = {}
    for k, vals in draws.items():
        v = np.array(vals)
        res = {"low": float(np.nanpercentile(v, 2.5)), "high": float(np.nanpercentile(v, 97.5))}
        if reference is not None and k != reference:
            d = v - np.array(draws[reference])
            res.update(diff_low=float(np.nanpercentile(d, 2.5)),
                       diff_high=float(np.nanpercentile(d, 97.5)),
                       p_better=float(np.nanmean(d > 0)))
        out[k] = res
    return out

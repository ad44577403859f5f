"""Where the released model loses macro-F1 to gradient boosting, per disorder (issue 12).

    clinragen-train gap --data .run/train/default/data --external .run/train/default/external

The released model's head runs through the worker's runtime (the exported prefix graph, the
calibrated probabilities) and gradient boosting is the evaluation's (`FeatureClassifier`);
both go through the worker's conclusion rule. Per disorder of the test split: positives, AUROC,
F1, and how many visits reached the disorder's threshold but lost it to the cap of codes
(`predict.conclude.OVER_CAP`). Then the conclusion-rule alternatives on every split (the cap,
the order within it: probability or margin over the disorder's own threshold), and, for the
disorders named, gradient boosting on lab features alone, on note text alone and on both: how
much of a disorder the notes reveal (the head reads only `max_note_tokens` note tokens).
Choices are read on the valid split; test and external are reported beside them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clinragen_fhir.encoding.features import collate
from clinragen_fhir.inference.predictor import OnnxPredictor
from clinragen_fhir.knowledge import KnowledgeGraph
from clinragen_fhir.knowledge.retrieval import supported_by
from clinragen_fhir.predict.conclude import OVER_CAP, conclude
from clinragen_fhir.predict.types import has_inputs
from training.baselines import FeatureClassifier, closure, decide, sexes_and_ages
from training.example import Example, label_matrix
from training.metrics import auroc, bootstrap_macro_f1, classification_report
from training.vocabulary import revealable_disorders

TEXT_PROBES = ("38341003", "59621000", "80394007", "157141000119108", "414545008")


Rule = tuple[float, dict[str, float], dict[str, float]]  # threshold, per disorder, base rates


def head_probabilities(model_dir: Path, examples: Sequence[Example], disorders: Sequence[str],
                       kg: KnowledgeGraph, batch_size: int = 16) -> tuple[np.ndarray, Rule]:
    """The released head's calibrated probabilities (prefix graph only, no decoding) and its
    conclusion rule's settings."""
    pred = OnnxPredictor.load(model_dir, kg, "fp32", "cpu", 1)
    cfg = pred.model.config
    col = {c: j for j, c in enumerate(disorders)}
    out = np.zeros((len(examples), len(disorders)))
    rows = [i for i, e in enumerate(examples) if has_inputs(e.labs, e.notes)]
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        arrays = collate([pred.featurise(examples[i].labs, examples[i].notes,
                                         examples[i].patient)[0] for i in chunk])
        p = pred.model.probabilities(pred.model.run_prefix(arrays).diagnosis_logits)
        for r, i in enumerate(chunk):
            for j, c in enumerate(cfg.disorders):
                if c in col:
                    out[i, col[c]] = p[r, j]
    return out, (cfg.threshold, dict(cfg.thresholds), dict(cfg.base_rates))


def with_a_reading(kg: KnowledgeGraph, examples: Sequence[Example],
                   disorders: Sequence[str]) -> np.ndarray:
    """[n, D] bool: the example's record has a reading that is evidence for the disorder
    (`supported_by`, what its rationale line may cite): a concluded code without one can only
    say "no supporting reading"."""
    out = np.zeros((len(examples), len(disorders)), dtype=bool)
    for i, ex in enumerate(examples):
        found: set[str] = set()
        if ex.labs is not None and len(ex.labs):
            pairs = ex.labs[["loinc", "value"]].dropna(subset=["loinc"]).drop_duplicates()
            for loinc, value in pairs.itertuples(index=False):
                found |= supported_by(kg, str(loinc), float(value), ex.patient.sex)
        out[i] = [d in found for d in disorders]
    return out


def rule_variants(kg: KnowledgeGraph, probs: np.ndarray, disorders: Sequence[str],
                  examples: Sequence[Example], thresholds: Rule,
                  y: np.ndarray) -> dict[str, dict[str, float]]:
    """macro-F1, codes per report and the share of concluded codes with a supporting reading in
    the record, for caps 3-5, the cap keeping the most probable codes, those with the largest
    lift over their base rate, or the largest margin over their own threshold; and the lift
    with only codes that have a supporting reading (every diagnosis could cite one)."""
    g, per, rates = thresholds
    own = np.array([per.get(c, g) for c in disorders])
    reading = with_a_reading(kg, examples, disorders)
    out = {}
    orders = ("probability", "lift", "margin", "lift, only with a reading")
    for cap in (3, 4, 5):
        for order in orders:
            if order == "margin":  # p / own threshold reaches 1 exactly when p reaches it
                concluded, closed = decide(kg, probs / np.maximum(own, 1e-6), disorders,
                                           examples, 1.0, None, cap)
            else:
                p = np.where(reading, probs, 0.0) if order.endswith("reading") else probs
                concluded, closed = decide(kg, p, disorders, examples, g, per, cap,
                                           rates if order.startswith("lift") else None)
            macro = classification_report(y, closed, probs, disorders).macro_f1
            n = int(concluded.sum())
            out[f"cap {cap}, by {order}"] = {
                "macro_f1": macro, "codes_per_report": float(concluded.sum(1).mean()),
                "with_a_reading": float((concluded.astype(bool) & reading).sum() / n)
                if n else float("nan")}
    return out


def per_disorder(kg: KnowledgeGraph, probs: np.ndarray, disorders: Sequence[str],
                 examples: Sequence[Example], thresholds: Rule,
                 y: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per disorder with a test positive: AUROC, F1 under the worker's rule (cap 3), and how
    many visits reached its threshold but lost it to the cap; one `conclude` pass gives both."""
    g, per, rates = thresholds
    sexes, ages = sexes_and_ages(examples)
    col = {c: j for j, c in enumerate(disorders)}
    concluded = np.zeros(probs.shape, dtype=int)
    capped = np.zeros(len(disorders), dtype=int)
    for i, row in enumerate(probs):
        c = conclude(row, disorders, kg, threshold=g, thresholds=per, min_confidence=0.5,
                     sex=sexes[i], age_years=ages[i], max_codes=3, base_rates=rates)
        concluded[i, [col[code] for code in c.codes]] = 1
        for code, why in c.dropped.items():
            if why == OVER_CAP:
                capped[col[code]] += 1
    report = classification_report(y, closure(kg, concluded, disorders), probs, disorders)
    out = {}
    for d, f1 in report.per_disorder_f1.items():
        concept = kg.disorder(d)
        out[d] = {"term": concept.term if concept is not None else d,
                  "positives": report.support[d], "threshold": per.get(d, g),
                  "auroc": report.per_disorder_auroc[d], "f1": f1,
                  "lost_to_the_cap": int(capped[col[d]])}
    return out


def text_probe(train: Sequence[Example], test: Sequence[Example], codes: Sequence[str],
               seed: int) -> dict[str, dict[str, float]]:
    """Test AUROC of gradient boosting on labs, on note text and on both, per code."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    fc = FeatureClassifier("boosting", seed)
    x_train, x_test = fc.matrix(train, fit=True), fc.matrix(test)
    n_lab = fc.lab_columns
    y_train, y_test = label_matrix(train, codes), label_matrix(test, codes)
    parts = {"labs": slice(0, n_lab), "notes": slice(n_lab, None), "both": slice(0, None)}
    out: dict[str, dict[str, float]] = {}
    for j, code in enumerate(codes):
        if y_test[:, j].sum() == 0 or y_train[:, j].sum() == 0:
            continue
        out[code] = {}
        for name, cols in parts.items():
            m = HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1,
                                               max_leaf_nodes=15, min_samples_leaf=5,
                                               random_state=seed).fit(x_train[:, cols],
                                                                      y_train[:, j])
            out[code][name] = auroc(y_test[:, j], m.predict_proba(x_test[:, cols])[:, 1])
    return out


def gap(model_dir: Path, splits: dict[str, list[Example]], kg: KnowledgeGraph,
        seed: int = 7) -> dict[str, Any]:
    """splits: train, valid, test and (optionally) external examples."""
    disorders = sorted(revealable_disorders(kg))
    scored = [s for s in ("valid", "test", "external") if splits.get(s)]
    ys = {s: label_matrix(splits[s], disorders) for s in scored}
    probs: dict[tuple[str, str], np.ndarray] = {}
    thresholds: dict[str, Rule] = {}
    for s in scored:
        probs[("slm", s)], thresholds["slm"] = head_probabilities(model_dir, splits[s],
                                                                  disorders, kg)
    gb = FeatureClassifier("boosting", seed).fit(splits["train"], splits["valid"], disorders)
    thresholds["boosting"] = (gb.threshold, dict(gb.thresholds), dict(gb.base_rates))
    for s in scored:
        probs[("boosting", s)] = gb.proba(splits[s])
    result: dict[str, Any] = {"model_dir": str(model_dir), "rules": {}, "per_disorder": {}}
    for system in ("slm", "boosting"):
        result["rules"][system] = {s: rule_variants(kg, probs[(system, s)], disorders,
                                                    splits[s], thresholds[system], ys[s])
                                   for s in scored}
        result["per_disorder"][system] = per_disorder(kg, probs[(system, "test")], disorders,
                                                      splits["test"], thresholds[system],
                                                      ys["test"])
    result["paired"] = {s: paired(kg, probs[("slm", s)], probs[("boosting", s)],
                                  (thresholds["slm"], thresholds["boosting"]), disorders,
                                  splits[s], ys[s], seed)
                        for s in scored if s != "valid"}
    result["text_probe"] = text_probe(splits["train"], splits["test"], TEXT_PROBES, seed)
    return result


def paired(kg: KnowledgeGraph, slm: np.ndarray, boosting: np.ndarray,
           rules: tuple[Rule, Rule], disorders: Sequence[str], examples: Sequence[Example],
           y: np.ndarray, seed: int) -> dict[str, float]:
    """macro-F1 of the SLM and gradient boosting under the worker's rule, each with its own
    thresholds and base rates, and the 95 % interval of their paired difference (patients
    resampled as the evaluation does, over the disorders with a positive here)."""
    preds = {}
    for name, probs, (g, per, rates) in (("slm", slm, rules[0]), ("boosting", boosting,
                                                                    rules[1])):
        preds[name] = decide(kg, probs, disorders, examples, g, per, 3, rates)[1]
    keep = y.sum(0) > 0
    ci = bootstrap_macro_f1(y[:, keep], {k: v[:, keep] for k, v in preds.items()},
                            [e.patient.patient_id for e in examples], "boosting", seed=seed)
    codes = [d for d, k in zip(disorders, keep, strict=True) if k]
    return {"slm": classification_report(y[:, keep], preds["slm"][:, keep], slm[:, keep],
                                         codes).macro_f1,
            "boosting": classification_report(y[:, keep], preds["boosting"][:, keep],
                                              boosting[:, keep], codes).macro_f1,
            "diff_low": ci["slm"]["diff_low"], "diff_high": ci["slm"]["diff_high"],
            "p_better": ci["slm"]["p_better"]}


def markdown(result: dict[str, Any]) -> str:
    slm, gb = result["per_disorder"]["slm"], result["per_disorder"]["boosting"]
    rows = ["| disorder | test positives | AUROC SLM / GB | F1 SLM / GB | lost to the cap "
            "SLM / GB |", "|---|---|---|---|---|"]
    for code, s in sorted(slm.items(), key=lambda kv: slm[kv[0]]["f1"] - gb[kv[0]]["f1"]):
        g = gb[code]
        rows.append(f"| {s['term']} | {s['positives']} | {s['auroc']:.3f} / {g['auroc']:.3f} | "
                    f"{s['f1']:.2f} / {g['f1']:.2f} | {s['lost_to_the_cap']} / "
                    f"{g['lost_to_the_cap']} |")
    names = list(next(iter(result["rules"]["slm"].values())))
    rows += ["", "| system | split | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for system, by_split in result["rules"].items():
        for split, variants in by_split.items():
            rows.append(f"| {system} | {split} | " + " | ".join(
                f"{v['macro_f1']:.3f} ({v['codes_per_report']:.2f}, "
                f"{v['with_a_reading']:.0%})"
                for v in variants.values()) + " |")
    rows += ["", "| split | SLM macro-F1 | GB macro-F1 | paired difference [95% CI] |",
             "|---|---|---|---|"]
    for split, p in result.get("paired", {}).items():
        rows.append(f"| {split} | {p['slm']:.3f} | {p['boosting']:.3f} | "
                    f"[{p['diff_low']:+.3f}, {p['diff_high']:+.3f}] |")
    rows += ["", "| disorder | GB AUROC: labs | notes | both |", "|---|---|---|---|"]
    for code, v in result["text_probe"].items():
        term = slm.get(code, {}).get("term", code)
        rows.append(f"| {term} | {v['labs']:.3f} | {v['notes']:.3f} | {v['both']:.3f} |")
    return "\n".join(rows) + "\n"


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    out.with_suffix(".md").write_text(markdown(result))

"""metrics.json: the released model's figures, read from its run. `training.release` writes it
into the artifact (hashed in release.json like the other files) and the model card
(`training.card`) prints it. Schema `METRICS_SCHEMA`; NaN/inf are written as null; figures
read from RUN_DIR/results.json, RUN_DIR/config.json and RUN_DIR/<variant>/<stage>/done.json:

    schema            "clinragen-metrics/1"
    config, variant   the run's config name and the released variant ("full")
    released_system   the released variant's row name in results.json
    backbone, vocabulary, train_examples, valid_examples, train_patients
    cohorts.internal  the held-out test split; cohorts.external: the external cohort (never used
                      for training or tuning; null when absent, which the gate refuses). Each:
        test_patients, test_examples, revealable_in_macro (revealable disorders with a positive
        there), revealable_positives, new_positives, revealable20 (how many disorders have
        >= 20 positives), best_baseline (the bootstrap reference: the better classifier),
        systems: one object per system, in results.json's order:
            system, rationale_kind ("rule" | "template" | "generated"), released (bool)
            macro_f1_revealable {value, low, high}       macro-F1 over (b), 95% bootstrap CI
            difference_to_best_baseline {reference, value, low, high, p_better} | null
                                  paired over patient resamples; for the reference itself
                                  value 0 and low/high/p_better null
            macro_f1_revealable20 macro-F1 over the disorders with >= 20 positives
            precision, recall     micro, over (b);  new_recall: recall of disorders new there
            codes_per_report, abstention_rate, rouge_l
            diagnoses, diagnoses_cited, diagnoses_cited_share, diagnosis_claims,
            diagnosis_claims_held  (generated rationales only; null otherwise): how many
                                  concluded diagnoses, how many of them with a lab claim and
                                  that share, how many claims, the share that hold
    training
        batch_size, head_batch_size   (head_batch_size: the effective one, 0 -> batch_size)
        wall_seconds {total, train, per_variant {variant: s}, source}
                      total: the whole `reproduce` run (timings_s["total"], null if absent);
                      per_variant: timings_s["train <variant>"], or the sum of its stages'
                      done.json seconds when results.json has no timings (source says which);
                      train: their sum
        timings_s     results.json's per step seconds, verbatim ({} when absent)
        variants {variant: {seconds, stages: [{stage, steps, head_steps, lm_steps,
                  examples_seen, seconds}]}}
                      steps from done.json; head_steps = the head-only steps among them
                      (stage 4); examples_seen = lm_steps x batch_size + head_steps x
                      head_batch_size
    gate              `training.gate.GateResult.to_json()`: verdict ("pass"), passed, system,
                      rule_baseline, goal_codes_per_report, checks [{name, cohort, value, limit,
                      relation, passed, message}]
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.gate import GateResult, check_release

METRICS_SCHEMA = "clinragen-metrics/1"
RESULTS = "results.json"


def released_system(variant: str) -> str:
    """The row name a variant has in results.json (`training.evaluate.VARIANT_TITLES`)."""
    from training.evaluate import VARIANT_TITLES

    return VARIANT_TITLES.get(variant, f"SLM {variant}")


def load_results(run_dir: Path) -> dict[str, Any] | None:
    """RUN_DIR/results.json, or None when the run was not evaluated."""
    f = run_dir / RESULTS
    if not f.is_file():
        return None
    results: dict[str, Any] = json.loads(f.read_text())
    return results


def run_metrics(cfg: TrainConfig, run_dir: Path, variant: str) -> dict[str, Any] | None:
    """`release_metrics` of an evaluated run (the gate asked afresh); None when not evaluated."""
    results = load_results(run_dir)
    return release_metrics(cfg, run_dir, variant, results) if results else None


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists, numpy-free (results.json is plain JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


GENERATED_KEYS = ("diagnoses", "diagnoses_cited", "diagnoses_cited_share", "diagnosis_claims",
                  "diagnosis_claims_held")


def _system_metrics(row: dict[str, Any], by_name: dict[str, dict[str, Any]],
                    released: str) -> dict[str, Any]:
    ci = row.get("macro_f1_ci") or {}
    value = _num(row.get("macro_f1_revealable"))
    reference = row.get("bootstrap_reference")
    diff: dict[str, Any] | None = None
    if ci and reference:
        if reference == row.get("system"):
            diff = {"reference": reference, "value": 0.0, "low": None, "high": None,
                    "p_better": None}
        else:
            ref = _num(by_name.get(reference, {}).get("macro_f1_revealable"))
            diff = {"reference": reference,
                    "value": value - ref if value is not None and ref is not None else None,
                    "low": _num(ci.get("diff_low")), "high": _num(ci.get("diff_high")),
                    "p_better": _num(ci.get("p_better"))}
    generated = row.get("rationale_kind") == "generated"
    return {
        "system": row.get("system"), "rationale_kind": row.get("rationale_kind"),
        "released": row.get("system") == released,
        "macro_f1_revealable": {"value": value, "low": _num(ci.get("low")),
                                "high": _num(ci.get("high"))},
        "difference_to_best_baseline": diff,
        "macro_f1_revealable20": _num(row.get("macro_f1_revealable20")),
        "precision": _num(row.get("micro_precision")),
        "recall": _num(row.get("micro_recall")),
        "new_recall": _num(row.get("new_recall")),
        "codes_per_report": _num(row.get("codes_per_report")),
        "abstention_rate": _num(row.get("abstention_rate")),
        "rouge_l": _num(row.get("rouge_l")),
        **{k: (_clean(row.get(k)) if generated else None) for k in GENERATED_KEYS},
    }


def _cohort_metrics(cohort: dict[str, Any] | None, released: str) -> dict[str, Any] | None:
    if not cohort:
        return None
    systems = list(cohort.get("systems", []))
    by_name = {str(r.get("system")): r for r in systems}
    reference = next((r.get("bootstrap_reference") for r in systems
                      if r.get("bootstrap_reference")), None)
    return {
        "test_patients": cohort.get("test_patients"),
        "test_examples": cohort.get("test_examples"),
        "revealable_in_macro": cohort.get("revealable_in_macro"),
        "revealable_positives": cohort.get("revealable_positives"),
        "new_positives": cohort.get("new_positives"),
        "revealable20": len(cohort.get("revealable20", [])),
        "best_baseline": reference,
        "systems": [_system_metrics(r, by_name, released) for r in systems],
    }


def _training_metrics(cfg: TrainConfig, run_dir: Path,
                      timings: dict[str, Any]) -> dict[str, Any]:
    head_batch = cfg.head_batch_size or cfg.batch_size
    variants: dict[str, Any] = {}
    for v in cfg.variants:
        if not (run_dir / v.name).is_dir():
            continue
        stages = []
        for stage, sc in cfg.stage_plan(v):
            f = run_dir / v.name / stage / "done.json"
            if not f.is_file():
                continue
            done = json.loads(f.read_text())
            steps = int(done["steps"])
            head = min(sc.head_steps + sc.refit_steps, steps) if stage == "diagnosis" else 0
            stages.append({"stage": stage, "steps": steps, "head_steps": head,
                           "lm_steps": steps - head,
                           "examples_seen": (steps - head) * cfg.batch_size + head * head_batch,
                           "seconds": _num(done.get("seconds"))})
        variants[v.name] = {"seconds": sum(s["seconds"] or 0.0 for s in stages),
                            "stages": stages}
    timed = all(f"train {v}" in timings for v in variants) and bool(variants)
    per_variant = {v: (_num(timings[f"train {v}"]) if timed else info["seconds"])
                   for v, info in variants.items()}
    return {
        "batch_size": cfg.batch_size, "head_batch_size": head_batch,
        "wall_seconds": {"total": _num(timings.get("total")),
                         "train": sum(s or 0.0 for s in per_variant.values()),
                         "per_variant": per_variant,
                         "source": "timings_s" if timed else "done.json"},
        "timings_s": _clean(dict(timings)),
        "variants": variants,
    }


def release_metrics(cfg: TrainConfig, run_dir: Path, variant: str, results: dict[str, Any],
                    gate: GateResult | None = None) -> dict[str, Any]:
    """metrics.json's content (schema in this module's docstring) from the run's results.json,
    config (`cfg`: the one the run used) and done.json files; `gate` defaults to asking it."""
    system = released_system(variant)
    gate = gate or check_release(results, system)
    out = {
        "schema": METRICS_SCHEMA, "config": results.get("config", cfg.name), "variant": variant,
        "released_system": system, "backbone": results.get("backbone", cfg.backbone),
        "vocabulary": results.get("vocabulary", cfg.vocabulary),
        "train_examples": results.get("train_examples"),
        "valid_examples": results.get("valid_examples"),
        "train_patients": results.get("train_patients"),
        "cohorts": {"internal": _cohort_metrics(results, system),
                    "external": _cohort_metrics(results.get("external"), system)},
        "training": _training_metrics(cfg, run_dir, results.get("timings_s") or {}),
        "gate": gate.to_json(),
    }
    return _clean(out)  # type: ignore[no-any-return]

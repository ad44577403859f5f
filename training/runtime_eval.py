"""The exported model through the worker's own runtime (`OnnxPredictor`), fp32 against int8, on
held-out patients: what int8 costs in the conclusions and the rationales (issue 17, item 3).

    clinragen-train runtime-eval --model .run/model/default --data .run/train/default/external

One visit per patient (seeded), every precision on the same visits, each scored by the
evaluation's own functions (`training.evaluate.score_cohort`: macro-F1 over the revealable
disorders with a 95 % interval over patients, codes per report, the share of diagnoses whose
line cites a reading, the share of claims that hold, ROUGE-L against the teacher). Beside them:
the paired difference of each precision to fp32, the share of patients with identical
conclusions, the largest probability shift, the share of identical rationales and the seconds
per patient (one process, `--threads`, a ratio in the same run: not a throughput claim).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clinragen_fhir.inference.predictor import OnnxPredictor
from clinragen_fhir.inference.runtime import Precision
from clinragen_fhir.knowledge import KnowledgeGraph
from clinragen_fhir.predict.types import has_inputs
from clinragen_fhir.report.faithfulness import LabLexicon
from training.baselines import SystemOutput, closure
from training.example import Example, label_matrix
from training.metrics import bootstrap_macro_f1, rouge_l
from training.vocabulary import revealable_disorders


def one_visit_per_patient(examples: Sequence[Example], patients: int, seed: int
                          ) -> list[Example]:
    """A seeded sample of `patients` patients, one of their visits each (patients resampled by
    the intervals are then independent)."""
    by_patient: dict[tuple[str, str], list[Example]] = {}
    for ex in examples:
        by_patient.setdefault((ex.source, ex.patient.patient_id), []).append(ex)
    rng = random.Random(seed)
    keys = sorted(by_patient)
    rng.shuffle(keys)
    return [rng.choice(by_patient[k]) for k in sorted(keys[:patients])]


def runtime_outputs(model_dir: Path, precision: Precision, examples: Sequence[Example],
                    disorders: Sequence[str], kg: KnowledgeGraph, threads: int,
                    batch_size: int) -> tuple[SystemOutput, float]:
    """One precision's SystemOutput on `examples` and its seconds per patient."""
    batches: list[np.ndarray] = []
    predictor = OnnxPredictor.load(model_dir, kg, precision, "cpu", threads, batch_size)
    predictor.on_probabilities = batches.append
    cfg = predictor.model.config
    col = {c: j for j, c in enumerate(disorders)}
    t0 = time.perf_counter()
    predictions = predictor.predict_batch([(ex.labs, ex.notes, ex.patient) for ex in examples])
    seconds = (time.perf_counter() - t0) / max(1, len(examples))
    n = len(examples)
    probs = np.zeros((n, len(disorders)))
    concluded = np.zeros((n, len(disorders)), dtype=int)
    head = np.concatenate(batches) if batches else np.zeros((0, len(cfg.disorders)))
    row = 0
    for i, (ex, p) in enumerate(zip(examples, predictions, strict=True)):
        if not has_inputs(ex.labs, ex.notes):
            continue  # abstained before the graph: no probabilities
        for j, code in enumerate(cfg.disorders):
            if code in col:
                probs[i, col[code]] = head[row, j]
        row += 1
        for d in p.diagnoses:
            if d.snomed in col:
                concluded[i, col[d.snomed]] = 1
    texts = [p.rationale for p in predictions]
    return SystemOutput(f"ClinRaGen ONNX {precision}", probs, closure(kg, concluded, disorders),
                        [p.abstained for p in predictions], texts, "generated",
                        {"concluded": concluded, "texts": texts}), seconds


def compare(model_dir: Path, examples: Sequence[Example], kg: KnowledgeGraph,
            precisions: Sequence[Precision] = ("fp32", "int8"), threads: int = 1,
            batch_size: int = 8, seed: int = 7) -> dict[str, Any]:
    """Every precision on the same held-out visits; the first precision is the reference."""
    from training.evaluate import score_cohort

    disorders = sorted(revealable_disorders(kg))
    outputs, seconds = [], {}
    for precision in precisions:
        out, s = runtime_outputs(model_dir, precision, examples, disorders, kg, threads,
                                 batch_size)
        outputs.append(out)
        seconds[precision] = s
    lexicon = LabLexicon.build(kg, [e.labs for e in examples if len(e.labs)])
    y = label_matrix(examples, disorders)
    keep = y.sum(0) > 0
    cohort = score_cohort(outputs, examples, disorders, kg, lexicon, keep, seed)
    groups = [e.patient.patient_id for e in examples]
    ref = outputs[0]
    paired = bootstrap_macro_f1(y[:, keep], {o.name: o.pred[:, keep] for o in outputs}, groups,
                                ref.name, seed=seed)
    result: dict[str, Any] = {
        "model_dir": str(model_dir), "patients": len(examples), "threads": threads,
        "batch_size": batch_size, "reference": precisions[0],
        "disorders_in_macro": int(keep.sum()), "positives": int(y[:, keep].sum()),
        "sources": cohort["sources"], "systems": {}}
    for precision, out, row in zip(precisions, outputs, cohort["systems"], strict=True):
        same = [set(np.flatnonzero(a)) == set(np.flatnonzero(b))
                for a, b in zip(out.extra["concluded"], ref.extra["concluded"], strict=True)]
        entry = {k: row.get(k) for k in (
            "macro_f1_revealable", "macro_f1_ci", "codes_per_report", "micro_precision",
            "micro_recall", "abstention_rate", "diagnoses", "diagnoses_cited_share",
            "diagnosis_claims", "diagnosis_claims_held", "rouge_l")}
        entry.update(
            macro_f1_diff_to_reference=paired[out.name] if out is not ref else None,
            identical_conclusions=float(np.mean(same)),
            max_probability_shift=float(np.abs(out.probs - ref.probs).max(initial=0.0)),
            identical_rationales=float(np.mean([a == b for a, b in zip(
                out.rationales, ref.rationales, strict=True)])),
            rouge_l_to_reference=rouge_l(out.rationales, ref.rationales),
            seconds_per_patient=seconds[precision],
            speed_vs_reference=seconds[precisions[0]] / seconds[precision])
        result["systems"][precision] = entry
    return result


def markdown(result: dict[str, Any]) -> str:
    """The comparison as a table (docs/performance.md)."""
    head = ("| precision | macro-F1 (b) [95% CI] | difference to fp32 [95% CI] | identical "
            "conclusions | max probability shift | codes per report | diagnoses citing a "
            "reading | claims that hold | identical rationales | ROUGE-L to fp32 | s / patient "
            "(x fp32) |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for precision, s in result["systems"].items():
        ci = s["macro_f1_ci"] or {}
        diff = s["macro_f1_diff_to_reference"]
        rows.append(
            f"| {precision} | {s['macro_f1_revealable']:.3f} [{ci.get('low', float('nan')):.3f}, "
            f"{ci.get('high', float('nan')):.3f}] | "
            + (f"[{diff['diff_low']:+.3f}, {diff['diff_high']:+.3f}]" if diff else "reference")
            + f" | {100 * s['identical_conclusions']:.1f} % | {s['max_probability_shift']:.4f} | "
            f"{s['codes_per_report']:.2f} | {100 * s['diagnoses_cited_share']:.1f} % "
            f"({s['diagnoses']}) | {100 * s['diagnosis_claims_held']:.1f} % "
            f"({s['diagnosis_claims']}) | {100 * s['identical_rationales']:.1f} % | "
            f"{s['rouge_l_to_reference']:.1f} | {s['seconds_per_patient']:.2f} "
            f"({s['speed_vs_reference']:.2f}x) |")
    return "\n".join(rows) + (
        f"\n\n{result['patients']} held-out patients ({', '.join(result['sources'])}), one visit "
        f"each; {result['disorders_in_macro']} revealable disorders with a positive "
        f"({result['positives']} positives); {result['threads']} onnxruntime thread(s), batches "
        f"of {result['batch_size']}.\n")


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    out.with_suffix(".md").write_text(markdown(result))

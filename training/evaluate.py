"""One comparison table on the held-out (test split) patients: the rule baseline, two feature
classifiers, the SLM without knowledge, the SLM without staged distillation, and the full model.

Columns: micro/macro F1 (macro over disorders with a positive in the test split), macro AUROC,
ECE, abstention rate, BLEU-4 and ROUGE-L of the rationale against the teacher's diagnosis
rationale, and faithfulness (share of lab claims that match the record, `training.faithfulness`).
SLM decisions are what the worker concludes (codes on the generated diagnosis line, plus any the
calibrated head puts at or above the tuned threshold); the head-only scores are in the JSON too.
Abstentions do not remove examples from F1 (an abstaining system still made its call); the
abstention rate is reported beside it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clinragen_fhir.knowledge import KnowledgeGraph
from model.decode import abstain, split_output
from training.baselines import FeatureClassifier, SystemOutput, label_matrix, rule_outputs
from training.config import TrainConfig, VariantConfig, stage_modalities
from training.distill import encode, load_variant, teacher_rationale
from training.example import Example
from training.faithfulness import LabLexicon, check_rationale, summarise
from training.metrics import bleu4, classification_report, rouge_l

VARIANT_TITLES = {"full": "ClinRaGen SLM (full: staged + knowledge)",
                  "no_knowledge": "SLM without knowledge (attention off)",
                  "no_staging": "SLM without staged distillation (stage 4 only)"}


@torch.no_grad()
def slm_outputs(cfg: TrainConfig, variant: VariantConfig, run_dir: Path, kg: KnowledgeGraph,
                examples: Sequence[Example], disorders: Sequence[str],
                progress: bool = True) -> SystemOutput:
    """Generate each test patient's rationale and diagnosis line; head probabilities calibrated."""
    from tqdm.auto import tqdm

    model = load_variant(cfg, variant, run_dir, kg)
    mc = model.config
    col = {d: j for j, d in enumerate(disorders)}
    terms = {t.lower(): c for c, t in zip(mc.disorders, mc.disorder_terms, strict=True)}
    data = encode(model, examples, stage_modalities("diagnosis", variant.knowledge), None, kg,
                  cfg.max_target_tokens, "test features")
    n, d = len(examples), len(disorders)
    probs, pred, head = np.zeros((n, d)), np.zeros((n, d), dtype=int), np.zeros((n, d), dtype=int)
    abstained: list[bool] = []
    rationales: list[str] = []
    texts: list[str] = []
    bs = cfg.eval_batch_size
    t0 = time.perf_counter()
    for s in tqdm(range(0, n, bs), desc=f"generate {variant.name}", disable=not progress,
                  leave=False):
        batch = model.batch([e.features for e in data[s:s + bs]])
        out, _ = model.generate(batch, cfg.max_new_tokens)
        p_all = model.probabilities(batch).cpu().numpy()
        for k, text in enumerate(out):
            i = s + k
            ex = examples[i]
            rationale, codes = split_output(text, set(mc.disorders), terms)
            p = p_all[k]
            for j, code in enumerate(mc.disorders):
                if code in col:
                    probs[i, col[code]] = p[j]
                    if p[j] >= mc.threshold:
                        head[i, col[code]] = pred[i, col[code]] = 1
            for code in codes:
                if code in col:
                    pred[i, col[code]] = 1
            no_input = (ex.labs is None or ex.labs.empty) and not ex.notes
            flag, _ = abstain(p.tolist(), mc.threshold, mc.min_confidence)
            abstained.append(no_input or flag)
            rationales.append(rationale)
            texts.append(text)
    seconds = time.perf_counter() - t0
    return SystemOutput(VARIANT_TITLES.get(variant.name, f"SLM {variant.name}"), probs, pred,
                        abstained, rationales, "generated",
                        {"head_pred": head, "texts": texts, "temperature": mc.temperature,
                         "threshold": mc.threshold, "generate_seconds": seconds,
                         "variant": variant.name})


def score(output: SystemOutput, y: np.ndarray, disorders: Sequence[str],
          ece_cols: np.ndarray, examples: Sequence[Example], lexicon: LabLexicon
          ) -> dict[str, Any]:
    """Every table column for one system, plus per-disorder detail."""
    rep = classification_report(y, output.pred, output.probs, disorders)
    ece = classification_report(y[:, ece_cols], output.pred[:, ece_cols],
                                output.probs[:, ece_cols],
                                [d for d, k in zip(disorders, ece_cols, strict=True) if k]).ece
    refs = [(i, teacher_rationale(ex.rationales.get("diagnosis", "")))
            for i, ex in enumerate(examples)]
    refs = [(i, r) for i, r in refs if r.strip()]
    hyps = [output.rationales[i] for i, _ in refs]
    checks = [check_rationale(r, ex.labs, lexicon)
              for r, ex in zip(output.rationales, examples, strict=True)]
    faith = summarise(checks)
    failures: dict[str, int] = {}
    for c in checks:
        for x in c:
            if not x.matched:
                failures[x.reason] = failures.get(x.reason, 0) + 1
    result: dict[str, Any] = {
        "system": output.name, "rationale_kind": output.rationale_kind,
        "micro_f1": rep.micro_f1, "macro_f1": rep.macro_f1, "macro_auroc": rep.macro_auroc,
        "ece": ece, "abstention_rate": float(np.mean(output.abstained)) if output.abstained
        else float("nan"),
        "bleu4": bleu4(hyps, [r for _, r in refs]) if refs else float("nan"),
        "rouge_l": rouge_l(hyps, [r for _, r in refs]) if refs else float("nan"),
        "faithfulness": faith.share, "claims": faith.claims, "claims_matched": faith.matched,
        "claims_per_rationale": faith.claims_per_rationale, "claim_failures": failures,
        "per_disorder_f1": rep.per_disorder_f1, "per_disorder_auroc": rep.per_disorder_auroc,
        "examples": [{"example_id": examples[i].example_id, "rationale": output.rationales[i]}
                     for i in range(min(3, len(examples)))],
    }
    if "head_pred" in output.extra:
        head = classification_report(y, output.extra["head_pred"], output.probs, disorders)
        result["head_only"] = {"micro_f1": head.micro_f1, "macro_f1": head.macro_f1}
    for key in ("temperature", "threshold", "generate_seconds"):
        if key in output.extra:
            result[key] = output.extra[key]
    return result


def evaluate(cfg: TrainConfig, run_dir: Path, examples: Sequence[Example], kg: KnowledgeGraph,
             out_dir: Path, variants: Sequence[str] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Score every system on the test split; write results.json, results.md, per_disorder_f1.png."""
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, cfg.threads))
    train = [e for e in examples if e.split == "train"]
    valid = [e for e in examples if e.split == "valid"]
    test = [e for e in examples if e.split == "test"]
    if not test:
        raise ValueError("no test examples")
    disorders = sorted(kg.disorders())
    y = label_matrix(test, disorders)
    seen = (label_matrix(train, disorders).sum(0) > 0) | (y.sum(0) > 0)
    lexicon = LabLexicon.build(kg, [e.labs for e in examples if len(e.labs)])
    outputs: list[SystemOutput] = [rule_outputs(kg, test, disorders)]
    for kind in ("logistic", "boosting"):
        clf = FeatureClassifier(kind, cfg.seed).fit(train, valid, disorders)
        outputs.append(clf.outputs(test, kg, cfg.min_confidence))
    names = list(variants) if variants is not None else [v.name for v in cfg.variants]
    order = ["no_knowledge", "no_staging", "full"]
    names.sort(key=lambda n: order.index(n) if n in order else -1)
    for name in names:
        vdir = run_dir / name
        if not (vdir / "final.json").is_file():
            continue
        outputs.append(slm_outputs(cfg, cfg.variant(name), run_dir, kg, test, disorders,
                                   progress))
    rows = [score(o, y, disorders, seen, test, lexicon) for o in outputs]
    results = {
        "config": cfg.name, "backbone": cfg.backbone,
        "test_examples": len(test), "test_patients": len({e.patient.patient_id for e in test}),
        "train_examples": len(train), "valid_examples": len(valid),
        "sources": sorted({e.source for e in examples}),
        "disorders_in_macro": int((y.sum(0) > 0).sum()),
        "disorder_terms": {d: kg.disorder(d).term for d in disorders  # type: ignore[union-attr]
                           if y[:, disorders.index(d)].sum() > 0},
        "systems": rows, "seconds": time.perf_counter() - t0,
    }
    write_results(results, out_dir)
    return results


def _fmt(x: Any, pct: bool = False, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.1f} %" if pct else f"{x:.{digits}f}"


def markdown_table(results: dict[str, Any]) -> str:
    head = ("| system | micro-F1 | macro-F1 | macro-AUROC | ECE | abstain | BLEU-4 | ROUGE-L | "
            "faithfulness (claims) | rationale |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in results["systems"]:
        faith = (f"{_fmt(r['faithfulness'], pct=True)} ({r['claims']})"
                 + (" by construction" if r["rationale_kind"] == "template" else ""))
        lines.append(
            f"| {r['system']} | {_fmt(r['micro_f1'])} | {_fmt(r['macro_f1'])} | "
            f"{_fmt(r['macro_auroc'])} | {_fmt(r['ece'])} | {_fmt(r['abstention_rate'], True)} | "
            f"{_fmt(r['bleu4'], digits=1)} | {_fmt(r['rouge_l'], digits=1)} | {faith} | "
            f"{r['rationale_kind']} |")
    meta = (f"\n{results['test_examples']} test examples from {results['test_patients']} held-out "
            f"patients ({results['train_examples']} train, {results['valid_examples']} valid); "
            f"macro averages over {results['disorders_in_macro']} disorders with a positive in "
            f"the test split; backbone `{results['backbone']}`, config `{results['config']}`.\n")
    return head + "\n".join(lines) + "\n" + meta


def plot_per_disorder(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = results["disorder_terms"]
    codes = sorted(terms, key=lambda c: terms[c])
    systems = results["systems"]
    if not codes:
        return
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(codes) + 3), 5))
    for k, r in enumerate(systems):
        vals = [r["per_disorder_f1"].get(c, 0.0) for c in codes]
        ax.bar(np.arange(len(codes)) + k * width, vals, width, label=r["system"])
    ax.set_xticks(np.arange(len(codes)) + 0.4 - width / 2)
    ax.set_xticklabels([terms[c][:28] for c in codes], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("F1 (test split)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(f"Per-disorder F1, {results['config']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(results: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (out_dir / "results.md").write_text(markdown_table(results))
    plot_per_disorder(results, out_dir / "per_disorder_f1.png")

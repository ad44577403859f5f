"""One comparison table on the held-out (test split) patients: the rule baseline, two feature
classifiers, the SLM without knowledge, the SLM without staged distillation, and the full model.

Columns: micro/macro F1 over (a) every disorder with a positive in the test split and (b) the
lab-revealable ones among them (`revealable_disorders`: at least one crg:Finding supports them in
the graph), macro AUROC over (a) and (b), ECE, abstention rate (`model.decode.abstain`, the same
rule for every system), BLEU-4 and ROUGE-L of the rationale against the teacher's diagnosis
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
from clinragen_fhir.report.faithfulness import LabLexicon, check_rationale, summarise
from model.decode import abstain, split_output
from training.baselines import FeatureClassifier, SystemOutput, label_matrix, rule_outputs
from training.config import TrainConfig, VariantConfig, stage_modalities
from training.distill import encode, load_variant, teacher_rationale
from training.example import Example
from training.metrics import (
    ClassificationReport,
    bleu4,
    bootstrap_macro_f1,
    classification_report,
    rouge_l,
)
from training.vocabulary import revealable_disorders

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


def _subset(y: np.ndarray, output: SystemOutput, disorders: Sequence[str],
            cols: np.ndarray) -> ClassificationReport:
    """The report over the columns in `cols` that have a test positive (micro-F1 included: false
    positives on disorders nobody in the test split has are not counted here)."""
    keep = np.asarray(cols, dtype=bool) & (y.sum(0) > 0)
    return classification_report(y[:, keep], output.pred[:, keep], output.probs[:, keep],
                                 [d for d, k in zip(disorders, keep, strict=True) if k])


def score(output: SystemOutput, y: np.ndarray, disorders: Sequence[str],
          ece_cols: np.ndarray, examples: Sequence[Example], lexicon: LabLexicon,
          revealable: np.ndarray | None = None) -> dict[str, Any]:
    """Every table column for one system, plus per-disorder detail. `revealable` marks the
    disorders of column set (b) (default: none)."""
    rep = classification_report(y, output.pred, output.probs, disorders)
    everything = _subset(y, output, disorders, np.ones(len(disorders), dtype=bool))
    shown = _subset(y, output, disorders, revealable if revealable is not None
                    else np.zeros(len(disorders), dtype=bool))
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
        "micro_f1": everything.micro_f1, "macro_f1": everything.macro_f1,
        "macro_auroc": everything.macro_auroc,
        "micro_f1_revealable": shown.micro_f1 if shown.per_disorder_f1 else float("nan"),
        "macro_f1_revealable": shown.macro_f1, "macro_auroc_revealable": shown.macro_auroc,
        "micro_f1_vocabulary": rep.micro_f1,  # false positives on absent disorders counted too
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
        head_out = SystemOutput(output.name, output.probs, output.extra["head_pred"], [], [], "")
        head = _subset(y, head_out, disorders, np.ones(len(disorders), dtype=bool))
        head_b = _subset(y, head_out, disorders, revealable if revealable is not None
                         else np.zeros(len(disorders), dtype=bool))
        result["head_only"] = {"micro_f1": head.micro_f1, "macro_f1": head.macro_f1,
                               "macro_f1_revealable": head_b.macro_f1}
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
    shown = revealable_disorders(kg)
    revealable = np.array([d in shown for d in disorders])
    present = y.sum(0) > 0
    outputs: list[SystemOutput] = [rule_outputs(kg, test, disorders, cfg.min_confidence)]
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
    rows = [score(o, y, disorders, seen, test, lexicon, revealable) for o in outputs]
    # 95% intervals over patients, paired; the reference is the strongest feature baseline
    groups = [e.patient.patient_id for e in test]
    reference = max(outputs[1:3], key=lambda o: rows[outputs.index(o)]["macro_f1"]).name
    cis = bootstrap_macro_f1(y, {o.name: o.pred for o in outputs}, groups, reference,
                             seed=cfg.seed)
    for row in rows:
        row["macro_f1_ci"] = cis[row["system"]]
        row["bootstrap_reference"] = reference
    results = {
        "config": cfg.name, "backbone": cfg.backbone,
        "test_examples": len(test), "test_patients": len({e.patient.patient_id for e in test}),
        "train_examples": len(train), "valid_examples": len(valid),
        "sources": sorted({e.source for e in examples}),
        "disorders_in_macro": int(present.sum()), "positives_in_macro": int(y.sum()),
        "revealable_in_macro": int((present & revealable).sum()),
        "revealable_positives": int(y[:, revealable].sum()),
        "revealable_in_graph": int(revealable.sum()),
        "revealable": [d for d, k in zip(disorders, present & revealable, strict=True) if k],
        "disorder_terms": {d: kg.disorder(d).term for d in disorders  # type: ignore[union-attr]
                           if y[:, disorders.index(d)].sum() > 0},
        "disorder_support": {d: int(y[:, j].sum()) for j, d in enumerate(disorders)
                             if present[j]},
        "systems": rows, "seconds": time.perf_counter() - t0,
    }
    write_results(results, out_dir)
    return results


def _fmt(x: Any, pct: bool = False, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.1f} %" if pct else f"{x:.{digits}f}"


def _ci(row: dict[str, Any]) -> str:
    ci = row.get("macro_f1_ci")
    return f" [{ci['low']:.3f}, {ci['high']:.3f}]" if ci else ""


def markdown_table(results: dict[str, Any]) -> str:
    head = ("| system | micro-F1 (a) | macro-F1 (a) [95% CI] | micro-F1 (b) | macro-F1 (b) | "
            "micro-F1 (vocab) | macro-AUROC (a) | macro-AUROC (b) | ECE | abstain | BLEU-4 | "
            "ROUGE-L | faithfulness (claims) | rationale |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in results["systems"]:
        faith = (f"{_fmt(r['faithfulness'], pct=True)} ({r['claims']})"
                 + (" by construction" if r["rationale_kind"] == "template" else ""))
        lines.append(
            f"| {r['system']} | {_fmt(r['micro_f1'])} | {_fmt(r['macro_f1'])}{_ci(r)} | "
            f"{_fmt(r.get('micro_f1_revealable'))} | {_fmt(r.get('macro_f1_revealable'))} | "
            f"{_fmt(r.get('micro_f1_vocabulary'))} | {_fmt(r['macro_auroc'])} | "
            f"{_fmt(r.get('macro_auroc_revealable'))} | "
            f"{_fmt(r['ece'])} | {_fmt(r['abstention_rate'], True)} | "
            f"{_fmt(r['bleu4'], digits=1)} | {_fmt(r['rouge_l'], digits=1)} | {faith} | "
            f"{r['rationale_kind']} |")
    paired = [r for r in results["systems"] if "p_better" in r.get("macro_f1_ci", {})
              and r["rationale_kind"] == "generated"]
    if paired:
        ref = paired[0]["bootstrap_reference"]
        lines.append("")
        lines.append(f"Paired bootstrap over patients (1,000 resamples) against {ref}, "
                     "macro-F1 (a): " + "; ".join(
                         f"{r['system']}: difference [{r['macro_f1_ci']['diff_low']:+.3f}, "
                         f"{r['macro_f1_ci']['diff_high']:+.3f}], better in "
                         f"{100 * r['macro_f1_ci']['p_better']:.0f} % of resamples"
                         for r in paired) + ".")
    pos = results.get("positives_in_macro")
    rpos = results.get("revealable_positives")
    meta = (f"\n{results['test_examples']} test examples from {results['test_patients']} held-out "
            f"patients ({results['train_examples']} train, {results['valid_examples']} valid); "
            f"backbone `{results['backbone']}`, config `{results['config']}`. "
            f"(a) = the {results['disorders_in_macro']} disorders with a positive in the test "
            f"split" + (f" ({pos} positives)" if pos is not None else "") + "; "
            f"(b) = the {results.get('revealable_in_macro', 'n/a')} of them a lab finding "
            f"supports in the knowledge graph"
            + (f" ({rpos} positives)" if rpos is not None else "") + ". "
            "Micro- and macro-F1 count only those columns; micro-F1 (vocab) also counts false "
            "positives on the disorders nobody in the test split has; abstention = the top "
            "disorder's probability inside the uncertain band around the tuned threshold.\n")
    return head + "\n".join(lines) + "\n" + meta


def plot_per_disorder(results: dict[str, Any], path: Path,
                      codes: Sequence[str] | None = None, title: str = "") -> None:
    """Bars of per-disorder test F1 per system over `codes` (default: every disorder with a
    test positive); a figure saying so when there is none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = results["disorder_terms"]
    support = results.get("disorder_support", {})
    chosen = [c for c in (codes if codes is not None else terms) if c in terms]
    chosen = sorted(chosen, key=lambda c: terms[c])
    systems = results["systems"]
    name = title or f"Per-disorder F1, {results['config']}"
    if not chosen:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{name}: no disorder of this set has a test positive",
                ha="center", va="center", fontsize=9)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(chosen) + 3), 5))
    for k, r in enumerate(systems):
        vals = [r["per_disorder_f1"].get(c, 0.0) for c in chosen]
        ax.bar(np.arange(len(chosen)) + k * width, vals, width, label=r["system"])
    ax.set_xticks(np.arange(len(chosen)) + 0.4 - width / 2)
    ax.set_xticklabels([terms[c][:40] + (f" (n={support[c]})" if c in support else "")
                        for c in chosen], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("F1 (test split)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(results: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=float))
    (out_dir / "results.md").write_text(markdown_table(results))
    plot_per_disorder(results, out_dir / "per_disorder_f1.png", results.get("revealable", []),
                      f"Per-disorder F1, lab-revealable disorders (b), {results['config']}")
    plot_per_disorder(results, out_dir / "per_disorder_f1_all.png",
                      title=f"Per-disorder F1, every disorder with a test positive (a), "
                            f"{results['config']}")

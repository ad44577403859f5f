"""One comparison table on the held-out (test split) patients: the rule baseline, two feature
classifiers, the SLM without knowledge, the SLM without staged distillation, and the full model.

Columns: micro/macro F1 over (a) every disorder with a positive in the test split and (b) the
lab-revealable ones among them (`revealable_disorders`: at least one crg:Finding supports them in
the graph), macro AUROC over (a) and (b), ECE, abstention rate
(`predict.diagnosis_line.abstain`, the same rule for every system), BLEU-4 and ROUGE-L of the
rationale against the teacher's diagnosis rationale, and faithfulness (share of lab claims
that match the record, `report.faithfulness`).
SLM decisions are what the worker concludes (codes on the generated diagnosis line, plus any the
calibrated head puts at or above the tuned threshold); the head-only scores are in the JSON too.
Abstentions do not remove examples from F1 (an abstaining system still made its call); the
abstention rate is reported beside it.

Over 400 lines because it is the one comparison table: every system scored by the same
functions on the same held-out patients, with the intervals and the paired differences beside
them; splitting the scoring from the table would let the two drift.
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
from clinragen_fhir.predict.diagnosis_line import split_output
from clinragen_fhir.report.faithfulness import (
    LabLexicon,
    check_rationale,
    diagnosis_claims,
    summarise_claims,
)
from training.baselines import (
    FeatureClassifier,
    SystemOutput,
    closure,
    rule_outputs,
    sexes_and_ages,
)
from training.config import TrainConfig, VariantConfig, stage_modalities
from training.distill import encode, load_variant, teacher_rationale
from training.example import Example, label_matrix
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
    """The worker's path: calibrated head probabilities -> `predict.conclude` (per-disorder
    thresholds, sex/age, most specific, cap) -> a rationale generated for those diagnoses."""
    from tqdm.auto import tqdm

    model = load_variant(cfg, variant, run_dir, kg)
    mc = model.config
    col = {d: j for j, d in enumerate(disorders)}
    term = {c: t for c, t in zip(mc.disorders, mc.disorder_terms, strict=True)}
    code_of = {t: c for c, t in term.items()}
    modalities = stage_modalities("diagnosis", variant.knowledge)
    data = encode(model, examples, modalities, None, kg, cfg.max_target_tokens, "test features")
    n, d = len(examples), len(disorders)
    probs = np.zeros((n, d))
    abstained: list[bool] = []
    texts: list[str | None] = [None] * n
    concluded = np.zeros((n, d), dtype=int)
    terms: list[list[str]] = []
    bs = cfg.eval_batch_size
    t0 = time.perf_counter()
    for s in range(0, n, bs):  # the head on every example (prefix only: cheap)
        rows = examples[s:s + bs]
        batch = model.batch([e.features for e in data[s:s + bs]])
        p_all = model.probabilities(batch).cpu().numpy()
        sexes, ages = sexes_and_ages(rows)
        for k, ex in enumerate(rows):
            c = mc.conclude_for(p_all[k], kg, sexes[k], ages[k])
            no_input = (ex.labs is None or ex.labs.empty) and not ex.notes
            abstained.append(no_input or c.abstained)
            for j, code in enumerate(mc.disorders):
                if code in col:
                    probs[s + k, col[code]] = p_all[k, j]
            for code in c.codes:
                if code in col:
                    concluded[s + k, col[code]] = 1
            terms.append([] if c.abstained else [term[code] for code in c.codes])
    head_seconds = time.perf_counter() - t0
    # rationales (grounded decoding, as the runtime) for all, or a seeded sample per cohort
    chosen = list(range(n))
    if 0 < cfg.eval_rationale_examples < n:
        chosen = sorted(np.random.default_rng(cfg.seed).choice(
            n, cfg.eval_rationale_examples, replace=False).tolist())
    t1 = time.perf_counter()
    for s in tqdm(range(0, len(chosen), bs), desc=f"generate {variant.name}",
                  disable=not progress, leave=False):
        idx = chosen[s:s + bs]
        batch = model.batch([model.featurise(examples[i].labs, examples[i].notes,
                                             examples[i].patient, modalities, cite=True)
                             for i in idx])  # the runtime's readings, marked with their evidence
        out = model.generate_grounded(batch, [terms[i] for i in idx], cfg.max_new_tokens,
                                      code_of.__getitem__)
        for i, text in zip(idx, out, strict=True):
            texts[i] = text
    seconds = time.perf_counter() - t1
    rationales = [split_output(t)[0] if t is not None else "" for t in texts]
    return SystemOutput(VARIANT_TITLES.get(variant.name, f"SLM {variant.name}"), probs,
                        closure(kg, concluded, disorders), abstained, rationales, "generated",
                        {"concluded": concluded, "texts": texts, "temperature": mc.temperature,
                         "threshold": mc.threshold, "thresholds": mc.thresholds,
                         "head_seconds": head_seconds, "generate_seconds": seconds,
                         "generated": [t is not None for t in texts],
                         "variant": variant.name})


def decision_metrics(output: SystemOutput, y: np.ndarray, y_new: np.ndarray,
                     disorders: Sequence[str], examples: Sequence[Example], kg: KnowledgeGraph,
                     lexicon: LabLexicon, cols: np.ndarray) -> dict[str, Any]:
    """What a report says: codes per report (most specific, as listed), precision and recall
    over `cols`, recall of the disorders new at the visit, and for generated rationales the
    share of concluded diagnoses whose line makes a lab claim and the share of claims that
    hold (`report.faithfulness.diagnosis_claims`)."""
    concluded = np.asarray(output.extra.get("concluded", output.pred), dtype=int)
    pred = np.asarray(output.pred, dtype=int)
    keep = np.asarray(cols, dtype=bool)
    tp = int((pred[:, keep] & y[:, keep]).sum())
    fp = int((pred[:, keep] & (1 - y[:, keep])).sum())
    fn = int(((1 - pred[:, keep]) & y[:, keep]).sum())
    new_pos = int(y_new[:, keep].sum())
    new_tp = int((pred[:, keep] & y_new[:, keep]).sum())
    per_report = concluded.sum(1)
    out: dict[str, Any] = {
        "codes_per_report": float(per_report.mean()) if len(per_report) else float("nan"),
        "codes_per_report_max": int(per_report.max(initial=0)),
        "reports_with_codes": float((per_report > 0).mean()) if len(per_report) else 0.0,
        "micro_precision": tp / (tp + fp) if tp + fp else float("nan"),
        "micro_recall": tp / (tp + fn) if tp + fn else float("nan"),
        "new_positives": new_pos,
        "new_recall": new_tp / new_pos if new_pos else float("nan"),
    }
    if output.rationale_kind == "generated":
        concepts = {c: kg.disorder(c) for c in disorders}
        term = {c: (x.term if x is not None else c) for c, x in concepts.items()}
        diagnoses = cited = claims = held = 0
        for i, ex in enumerate(examples):
            text = output.extra["texts"][i]
            if output.abstained[i] or text is None:
                continue
            order = np.argsort(-output.probs[i])
            terms = [term[disorders[j]] for j in order if concluded[i, j]]
            for dc in diagnosis_claims(text, terms, ex.labs, lexicon):
                diagnoses += 1
                cited += dc.cited
                claims += len(dc.checks)
                held += sum(c.matched for c in dc.checks)
        out.update(diagnoses=diagnoses, diagnoses_cited=cited,
                   diagnoses_cited_share=cited / diagnoses if diagnoses else float("nan"),
                   diagnosis_claims=claims,
                   diagnosis_claims_held=held / claims if claims else float("nan"))
    return out


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
    made = output.extra.get("generated") or [True] * len(examples)  # a sample may be generated
    refs = [(i, teacher_rationale(ex.rationales.get("diagnosis", "")))
            for i, ex in enumerate(examples) if made[i]]
    refs = [(i, r) for i, r in refs if r.strip()]
    hyps = [output.rationales[i] for i, _ in refs]
    checks = [check_rationale(r, ex.labs, lexicon)
              for r, ex, m in zip(output.rationales, examples, made, strict=True) if m]
    faith = summarise_claims(checks)
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
    for key in ("temperature", "threshold", "head_seconds", "generate_seconds"):
        if key in output.extra:
            result[key] = output.extra[key]
    return result


def evaluation_disorders(cfg: TrainConfig, kg: KnowledgeGraph) -> list[str]:
    """The disorder list every system is scored over: the head's vocabulary."""
    return sorted(revealable_disorders(kg) if cfg.vocabulary == "revealable" else kg.disorders())


def score_cohort(outputs: Sequence[SystemOutput], examples: Sequence[Example],
                 disorders: Sequence[str], kg: KnowledgeGraph, lexicon: LabLexicon,
                 seen: np.ndarray, seed: int, min_positives: int = 20) -> dict[str, Any]:
    """Every system's row on one cohort of held-out patients, with paired bootstrap intervals
    over patients against the better feature baseline, on macro-F1 over the revealable
    disorders with a positive here (b) and over those with >= `min_positives` positives (b20)."""
    y = label_matrix(examples, disorders)
    y_new = label_matrix(examples, disorders, key="new_labels")
    shown = revealable_disorders(kg)
    revealable = np.array([d in shown for d in disorders])
    present = y.sum(0) > 0
    big = revealable & (y.sum(0) >= min_positives)
    rows = [score(o, y, disorders, seen, examples, lexicon, revealable) for o in outputs]
    for o, row in zip(outputs, rows, strict=True):
        row.update(decision_metrics(o, y, y_new, disorders, examples, kg, lexicon, revealable))
        b20 = _subset(y, o, disorders, big)
        row["macro_f1_revealable20"] = b20.macro_f1 if b20.per_disorder_f1 else float("nan")
    groups = [e.patient.patient_id for e in examples]
    baselines = [o for o in outputs if o.rationale_kind == "template"]
    reference = max(baselines, key=lambda o: rows[list(outputs).index(o)]["macro_f1_revealable"]
                    ).name if baselines else None
    keep = revealable & present
    for key, cols in (("macro_f1_ci", keep), ("macro_f1_ci20", big)):
        if not cols.any():
            continue
        cis = bootstrap_macro_f1(y[:, cols], {o.name: o.pred[:, cols] for o in outputs}, groups,
                                 reference, seed=seed)
        for row in rows:
            row[key] = cis[row["system"]]
            row["bootstrap_reference"] = reference
    return {
        "test_examples": len(examples),
        "test_patients": len({(e.source, e.patient.patient_id) for e in examples}),
        "sources": sorted({e.source for e in examples}),
        "disorders_in_macro": int(present.sum()), "positives_in_macro": int(y.sum()),
        "revealable_in_macro": int(keep.sum()),
        "revealable_positives": int(y[:, revealable].sum()),
        "revealable20": [d for d, k in zip(disorders, big, strict=True) if k],
        "new_positives": int(y_new[:, revealable].sum()),
        "revealable": [d for d, k in zip(disorders, keep, strict=True) if k],
        "disorder_terms": {d: kg.disorder(d).term for d in disorders  # type: ignore[union-attr]
                           if y[:, disorders.index(d)].sum() > 0},
        "disorder_support": {d: int(y[:, j].sum()) for j, d in enumerate(disorders)
                             if present[j]},
        "systems": rows,
    }


def evaluate(cfg: TrainConfig, run_dir: Path, examples: Sequence[Example], kg: KnowledgeGraph,
             out_dir: Path, variants: Sequence[str] | None = None,
             progress: bool = True, external: Sequence[Example] = ()) -> dict[str, Any]:
    """Score every system on the test split (and, when given, on an external cohort nothing was
    trained or tuned on); write results.json, results.md, per_disorder_f1.png."""
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, cfg.threads))
    train = [e for e in examples if e.split == "train"]
    valid = [e for e in examples if e.split == "valid"]
    test = [e for e in examples if e.split == "test"]
    if not test:
        raise ValueError("no test examples")
    disorders = evaluation_disorders(cfg, kg)
    y = label_matrix(test, disorders)
    seen = (label_matrix(train, disorders).sum(0) > 0) | (y.sum(0) > 0)
    lexicon = LabLexicon.build(kg, [e.labs for e in [*examples, *external] if len(e.labs)])
    cohorts = {"internal": list(test), **({"external": list(external)} if external else {})}
    outputs: dict[str, list[SystemOutput]] = {
        k: [rule_outputs(kg, ex, disorders, cfg.min_confidence, cfg.max_codes)]
        for k, ex in cohorts.items()}
    for kind in ("logistic", "boosting"):
        clf = FeatureClassifier(kind, cfg.seed).fit(train, valid, disorders, cfg.min_precision)
        for k, ex in cohorts.items():
            outputs[k].append(clf.outputs(ex, kg, cfg.min_confidence, cfg.max_codes))
    names = list(variants) if variants is not None else [v.name for v in cfg.variants]
    order = ["no_knowledge", "no_staging", "full"]
    names.sort(key=lambda n: order.index(n) if n in order else -1)
    for name in names:
        if not (run_dir / name / "final.json").is_file():
            continue
        for k, ex in cohorts.items():
            outputs[k].append(slm_outputs(cfg, cfg.variant(name), run_dir, kg, ex, disorders,
                                          progress))
    internal = score_cohort(outputs["internal"], test, disorders, kg, lexicon, seen, cfg.seed)
    results = {
        "config": cfg.name, "backbone": cfg.backbone, "vocabulary": cfg.vocabulary,
        "train_examples": len(train), "valid_examples": len(valid),
        "train_patients": len({(e.source, e.patient.patient_id) for e in train}),
        **internal,
        "sources": sorted({e.source for e in examples}),
    }
    if external:
        results["external"] = score_cohort(outputs["external"], external, disorders, kg,
                                           lexicon, seen, cfg.seed)
    results["seconds"] = time.perf_counter() - t0
    write_results(results, out_dir)
    return results


def _fmt(x: Any, pct: bool = False, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.1f} %" if pct else f"{x:.{digits}f}"


def _ci(row: dict[str, Any]) -> str:
    ci = row.get("macro_f1_ci")
    return f" [{ci['low']:.3f}, {ci['high']:.3f}]" if ci else ""


def _diff(row: dict[str, Any], key: str = "macro_f1_ci") -> str:
    ci = row.get(key) or {}
    if "diff_low" not in ci:
        return "reference" if ci else "n/a"
    return f"[{ci['diff_low']:+.3f}, {ci['diff_high']:+.3f}]"


def _claims(row: dict[str, Any]) -> tuple[str, str]:
    """(diagnoses with a lab claim, claims that hold) as table cells."""
    if row["rationale_kind"] == "generated":
        cited = (f"{_fmt(row.get('diagnoses_cited_share'), pct=True)} "
                 f"({row.get('diagnoses_cited', 0)}/{row.get('diagnoses', 0)})")
        held = (f"{_fmt(row.get('diagnosis_claims_held'), pct=True)} "
                f"({row.get('diagnosis_claims', 0)})")
        return cited, held
    held = f"{_fmt(row['faithfulness'], pct=True)} ({row['claims']})" + (
        " by construction" if row["rationale_kind"] == "template" else "")
    return "n/a", held


def cohort_table(cohort: dict[str, Any]) -> str:
    """One cohort's rows: decisions as the worker makes them, scored over the revealable set."""
    head = ("| system | macro-F1 (b) [95% CI] | difference to the best baseline [95% CI] | "
            "macro-F1 (b, >= 20 positives) | precision (b) | recall (b) | recall of new | "
            "macro-AUROC (b) | codes per report | abstain | diagnoses with a lab claim | "
            "claims that hold | ROUGE-L | rationale |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in cohort["systems"]:
        cited, held = _claims(r)
        lines.append(
            f"| {r['system']} | {_fmt(r.get('macro_f1_revealable'))}{_ci(r)} | {_diff(r)} | "
            f"{_fmt(r.get('macro_f1_revealable20'))} | {_fmt(r.get('micro_precision'))} | "
            f"{_fmt(r.get('micro_recall'))} | {_fmt(r.get('new_recall'))} | "
            f"{_fmt(r.get('macro_auroc_revealable'))} | "
            f"{_fmt(r.get('codes_per_report'), digits=2)} | "
            f"{_fmt(r['abstention_rate'], True)} | {cited} | {held} | "
            f"{_fmt(r['rouge_l'], digits=1)} | {r['rationale_kind']} |")
    meta = (f"\n{cohort['test_examples']} visits of {cohort['test_patients']} held-out patients "
            f"({', '.join(cohort.get('sources', []))}). (b) = the "
            f"{cohort.get('revealable_in_macro', 'n/a')} revealable disorders with a positive here "
            f"({cohort.get('revealable_positives', 'n/a')} positives, "
            f"{cohort.get('new_positives', 'n/a')} of them new at the visit); >= 20 positives: "
            f"{len(cohort.get('revealable20', []))} disorders. Decisions are the worker's: "
            "per-disorder thresholds tuned on the valid split for precision, no code the "
            "patient's sex or age excludes, the most specific code only, at most 3 (those "
            "with the largest lift over their training base rate); F1 counts a "
            "concluded code's ancestors as concluded (as the labels do). Intervals: 1,000 "
            "resamples of patients, paired.\n")
    return head + "\n".join(lines) + "\n" + meta


def markdown_table(results: dict[str, Any]) -> str:
    """The internal test table and, when scored, the external cohort's."""
    out = (f"Internal test (config `{results['config']}`, backbone `{results['backbone']}`; "
           f"{results['train_examples']} train / {results['valid_examples']} valid visits):\n\n"
           + cohort_table(results))
    if "external" in results:
        out += ("\nExternal test (never used for training or tuning):\n\n"
                + cohort_table(results["external"]))
    return out


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

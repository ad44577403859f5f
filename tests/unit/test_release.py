"""The shipped default model as an artifact (training/release.py): release from a run, hashes
that catch an altered file, the model it loads is the trained one, install to an ONNX model_dir
the torch-free runtime serves, and retraining gives bit-identical tensors. On a tiny backbone.

Over 400 lines because release, install and the bit-identical retrain share one tiny trained
run, made once per session by the fixtures here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from clinragen_fhir.inference import OnnxPredictor  # noqa: E402
from clinragen_fhir.knowledge import KnowledgeGraph, load_graph  # noqa: E402
from tests.unit.release_results import FULL, hand_results  # noqa: E402
from tests.unit.train_examples import make_examples  # noqa: E402
from training.config import STAGES, StageConfig, TrainConfig, VariantConfig  # noqa: E402
from training.distill import head_logits, load_variant, train_variant  # noqa: E402
from training.example import Example  # noqa: E402
from training.release import (  # noqa: E402
    INSTALLED,
    METRICS,
    WEIGHTS,
    ReleaseError,
    compare_weights,
    install,
    installed_from,
    load_release,
    read_release,
    release,
)
from training.release_metrics import METRICS_SCHEMA  # noqa: E402


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
    # an evaluation the gate passes (hand-written: evaluate() has its own tests)
    (run / "results.json").write_text(json.dumps(hand_results(), indent=1))
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
    assert set(manifest["sha256"]) == {WEIGHTS, "calibration.json", "tiny_vocab.json", METRICS}
    assert "train.jsonl" in manifest["data_sha256"]
    weights = load_file(str(artifact / WEIGHTS))
    assert weights and all("lora_" in k or k.startswith("prefix.") for k in weights)
    assert "Not a medical device" in (artifact / "MODEL_CARD.md").read_text()


def test_metrics_json_holds_the_documented_figures(run_and_artifact: tuple[Path, Path]) -> None:
    run, artifact = run_and_artifact
    assert METRICS in read_release(artifact)["sha256"]  # hashed like every other file
    text = (artifact / METRICS).read_text()
    assert "NaN" not in text  # strict JSON: results.json's NaN become null
    m = json.loads(text)
    assert set(m) == {"schema", "config", "variant", "released_system", "backbone",
                      "vocabulary", "train_examples", "valid_examples", "train_patients",
                      "cohorts", "training", "gate"}
    assert m["schema"] == METRICS_SCHEMA and m["variant"] == "full"
    assert m["released_system"] == FULL
    internal, external = m["cohorts"]["internal"], m["cohorts"]["external"]
    assert (internal["test_patients"], external["test_patients"]) == (3, 7)
    assert (internal["test_examples"], external["test_examples"]) == (6, 14)
    assert internal["revealable20"] == 1 and external["best_baseline"].startswith("logistic")
    for cohort in (internal, external):
        rows = {r["system"]: r for r in cohort["systems"]}
        assert len(rows) == 4 and [r["system"] for r in cohort["systems"] if r["released"]] \
            == [FULL]
        full = rows[FULL]
        assert set(full) == {
            "system", "rationale_kind", "released", "macro_f1_revealable",
            "difference_to_best_baseline", "macro_f1_revealable20", "precision", "recall",
            "new_recall", "codes_per_report", "abstention_rate", "rouge_l", "diagnoses",
            "diagnoses_cited", "diagnoses_cited_share", "diagnosis_claims",
            "diagnosis_claims_held"}
        assert set(full["macro_f1_revealable"]) == {"value", "low", "high"}
        diff = full["difference_to_best_baseline"]
        assert diff["reference"] == cohort["best_baseline"]
        assert diff["value"] == pytest.approx(full["macro_f1_revealable"]["value"] - 0.35)
        assert (diff["low"], diff["high"], diff["p_better"]) == (-0.05, 0.08, 0.6)
        assert full["new_recall"] is None and full["diagnoses_cited_share"] == 0.9
        assert full["diagnosis_claims_held"] == 0.95 and full["rouge_l"] == 12.5
        ref = rows[cohort["best_baseline"]]["difference_to_best_baseline"]
        assert ref["value"] == 0.0 and ref["low"] is None
        rule = rows["rule baseline"]
        assert rule["diagnoses_cited_share"] is None and rule["rouge_l"] is None
    assert external["systems"][3]["macro_f1_revealable"]["value"] == 0.4
    training = m["training"]
    assert training["batch_size"] == 4 and training["head_batch_size"] == 4
    assert training["wall_seconds"] == {"total": 40.0, "train": 12.5,
                                        "per_variant": {"full": 12.5}, "source": "timings_s"}
    assert training["timings_s"]["evaluate"] == 3.0
    stages = {s["stage"]: s for s in training["variants"]["full"]["stages"]}
    assert list(stages) == ["notes", "labs", "multimodal", "diagnosis"]
    for name in stages:
        done = json.loads((run / "full" / name / "done.json").read_text())
        assert stages[name]["steps"] == done["steps"]
        assert stages[name]["seconds"] == pytest.approx(done["seconds"])
    assert stages["notes"] == {**stages["notes"], "steps": 2, "head_steps": 0, "lm_steps": 2,
                               "examples_seen": 8}
    assert (stages["diagnosis"]["steps"], stages["diagnosis"]["head_steps"]) == (7, 4)
    assert stages["diagnosis"]["examples_seen"] == 7 * 4
    gate = m["gate"]
    assert gate["verdict"] == "pass" and gate["system"] == FULL
    assert {c["name"]: c["value"] for c in gate["checks"]} == {
        "external_cohort": None, "external_macro_f1_vs_rule": 0.4,
        "external_codes_per_report": 1.6, "internal_codes_per_report": 1.5}


def test_metrics_and_gate_read_what_evaluate_writes(run_and_artifact: tuple[Path, Path],
                                                    kg: KnowledgeGraph, examples: list[Example],
                                                    tmp_path: Path) -> None:
    """The real results.json shape (training.evaluate on the tiny run, with an external cohort):
    every system of both cohorts in metrics.json, the gate's verdict decided on real rows."""
    from dataclasses import replace

    from training.evaluate import evaluate
    from training.gate import check_release
    from training.release_metrics import release_metrics

    run, _ = run_and_artifact
    external = [replace(e, split="test") for e in make_examples(6, seed=3)]
    results = evaluate(config(), run, examples, kg, tmp_path, progress=False, external=external)
    results = json.loads((tmp_path / "results.json").read_text())  # as release reads it
    m = json.loads(json.dumps(release_metrics(config(), run, "full", results),
                              allow_nan=False))
    for key, cohort in (("internal", results), ("external", results["external"])):
        got = m["cohorts"][key]
        assert got["test_patients"] == cohort["test_patients"]
        assert [r["system"] for r in got["systems"]] == [r["system"] for r in cohort["systems"]]
        full = next(r for r in got["systems"] if r["released"])
        assert full["system"] == FULL and full["diagnoses"] is not None
        assert full["codes_per_report"] == cohort["systems"][-1]["codes_per_report"]
    gate = check_release(results, FULL)
    assert m["gate"] == gate.to_json() and len(m["gate"]["checks"]) == 4


def test_examples_seen_count_head_only_steps_at_their_batch_size(tmp_path: Path) -> None:
    from training.release_metrics import release_metrics

    cfg = config()
    cfg.head_batch_size, cfg.variants = 32, [VariantConfig("full"),
                                            VariantConfig("no_staging", staged=False)]
    for variant, stage, steps, seconds in (("full", "notes", 2, 1.5), ("full", "diagnosis", 7, 4.0),
                                           ("no_staging", "diagnosis", 13, 6.0)):
        (tmp_path / variant / stage).mkdir(parents=True)
        (tmp_path / variant / stage / "done.json").write_text(json.dumps(
            {"steps": steps, "ran_now": steps, "seconds": seconds, "final_loss": 1.0}))
    res = hand_results()
    del res["timings_s"]  # evaluated by `clinragen-train evaluate`: no reproduce timings
    training = release_metrics(cfg, tmp_path, "full", res)["training"]
    full = {s["stage"]: s for s in training["variants"]["full"]["stages"]}
    assert list(full) == ["notes", "diagnosis"]  # the stages that finished
    assert full["diagnosis"]["examples_seen"] == 4 * 32 + 3 * 4
    unstaged = training["variants"]["no_staging"]["stages"]
    assert [(s["stage"], s["head_steps"], s["examples_seen"]) for s in unstaged] == [
        ("diagnosis", 4, 4 * 32 + 9 * 4)]
    assert training["wall_seconds"] == {"total": None, "train": 11.5, "source": "done.json",
                                        "per_variant": {"full": 5.5, "no_staging": 6.0}}


def test_the_gate_refuses_a_release_with_the_failing_number_and_writes_nothing(
        run_and_artifact: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from click.testing import CliRunner

    import training.cli as cli

    run, _ = run_and_artifact
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cases = [(hand_results(external_f1=0.21, external_rule=0.29),
              "external macro-F1 0.210 < rule baseline 0.290"),
             (hand_results(external_codes=3.4), "external codes per report 3.40 > goal 3.00"),
             (hand_results(internal_codes=3.2), "internal codes per report 3.20 > goal 3.00"),
             (hand_results(external=False), "no external cohort")]
    monkeypatch.setattr(cli, "load_config", lambda _: config())
    for results, message in cases:
        (copy / "results.json").write_text(json.dumps(results))
        with pytest.raises(ReleaseError, match=re.escape(message)):
            release(config(), copy, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        out = CliRunner().invoke(cli.main, ["default-model", "release", "--run", str(copy),
                                            "--out", str(tmp_path / "out")])
        assert out.exit_code != 0 and message in out.output, out.output
        assert not (tmp_path / "out").exists()
    (copy / "results.json").unlink()
    with pytest.raises(ReleaseError, match=r"no results\.json"):
        release(config(), copy, tmp_path / "out")
    (copy / "results.json").write_text(json.dumps(hand_results()))
    out = CliRunner().invoke(cli.main, ["default-model", "release", "--run", str(copy),
                                        "--out", str(tmp_path / "out")])
    assert out.exit_code == 0, out.output
    assert read_release(tmp_path / "out")["sha256"][METRICS]


def test_the_model_card_reads_the_student_data_and_figures_from_the_run(
        run_and_artifact: tuple[Path, Path]) -> None:
    from dataclasses import replace

    from training.card import model_card

    run, artifact = run_and_artifact
    card = " ".join((artifact / "MODEL_CARD.md").read_text().split())  # wrapping aside
    assert "Not a medical device" in card and "label-wise attention head" in card
    assert "Release gate: pass" in card and "external macro-F1 0.400 >= rule baseline" in card
    for system in (FULL, "logistic regression (labs + TF-IDF)",
                   "gradient boosting (labs + TF-IDF)", "rule baseline"):
        assert card.count(f"| {system} |") == 2  # internal and external tables
    assert "| 0.400 [0.300, 0.500] | +0.050 [-0.050, +0.080] |" in card  # external, full
    assert "1.60 codes per report; 90.0 % of 10 concluded diagnoses make a lab claim" in card
    assert "95.0 % of 20 claims hold" in card and "precision >= 0.8" in card
    assert "at most 3 codes" in card and "metrics.json" in card
    cfg = config()
    cfg = replace(cfg, backbone="smollm2", backbone_layers=8, lora_targets=("q_proj", "up_proj"),
                  min_precision=0.9, max_codes=2,
                  data={"synthea_patients": 3000, "synthea_seed": 1,
                        "synthea_state": "Massachusetts", "synthea_ages": "18-90",
                        "external_patients": 600, "external_seed": 2, "external_state": "Texas",
                        "external_ages": "30-95", "clinosim_population": 200,
                        "clinosim_seed": 7})
    card = " ".join(model_card(cfg, run, "full").split())
    assert "SmolLM2-135M-Instruct" in card and "cut to its first 8 decoder layers" in card
    assert "LoRA r=8 on q_proj, up_proj" in card
    assert "Synthea 3.3.0" in card and "Maven Central" in card
    assert "3000 patients, seed 1, Massachusetts, ages 18-90" in card
    assert "600 patients, seed 2, Texas, ages 30-95" in card
    assert "clinosim cohort" in card and "QI-Core" in card
    assert "precision >= 0.9" in card and "at most 2 codes" in card
    assert "cut to its first" not in model_card(replace(cfg, backbone_layers=0), run, "full")


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
    assert shipped.config.base_rates == trained.config.base_rates
    assert shipped.config.base_rates == json.loads((run / "full" / "final.json").read_text()
                                                   )["base_rates"] != {}
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


def test_releasing_the_shipped_model_writes_its_table_into_the_docs(
        run_and_artifact: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The table in docs/training.md and model/default/metrics.json come from one command."""
    import shutil

    from click.testing import CliRunner

    import training.cli as cli
    import training.release as release_module

    run, _ = run_and_artifact
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "results.json").write_text(json.dumps(hand_results()))
    doc = tmp_path / "training.md"
    doc.write_text("# Training\n\n<!-- results:t:begin -->\nstale-table\n<!-- results:t:end -->\n")
    monkeypatch.setattr(cli, "load_config", lambda _: config())
    monkeypatch.setattr(cli, "DOC", doc)
    monkeypatch.setattr(release_module, "ARTIFACT", tmp_path / "artifact")
    out = CliRunner().invoke(cli.main, ["default-model", "release", "--run", str(copy)])
    assert out.exit_code == 0, out.output
    text = doc.read_text()
    assert "stale-table" not in text and "| system |" in text and "default-model release" in text
    assert (tmp_path / "artifact" / METRICS).is_file()

"""The onnxruntime runtime on the tiny exported model: provider choice, batching, constrained
decoding, the Predictor, and bad model directories / over-long inputs (with the worker's
fallback to the rule baseline)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from clinragen_fhir.encoding.features import collate
from clinragen_fhir.encoding.schema import Note, Reading
from clinragen_fhir.inference import (
    InputTooLong,
    ModelOrBaseline,
    ModelUnavailable,
    OnnxModel,
    OnnxPredictor,
    build_predictor,
)
from clinragen_fhir.inference.generation import DiagnosisConstraint, greedy
from clinragen_fhir.inference.predictor import supporting_readings
from clinragen_fhir.inference.session import providers_for
from clinragen_fhir.knowledge.masking import MASK
from clinragen_fhir.knowledge.retrieval import supporting_tests
from clinragen_fhir.predict.diagnosis_line import split_output
from clinragen_fhir.predict.rules import RuleBaseline

pytest.importorskip("torch")  # the export that makes the model needs torch; the runtime does not
from tests.unit.onnx_fixtures import CODES, graph, patients
from tests.unit.test_export import exported_model_dir

slow = pytest.mark.slow  # the first use exports the tiny model (tens of seconds on 2 cores)


@pytest.fixture(scope="module")
def predictor() -> OnnxPredictor:
    return OnnxPredictor.load(exported_model_dir(), graph(), provider="cpu", threads=1)


def copy_model(tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(exported_model_dir(), dest)
    return dest


# -- provider choice and session ---------------------------------------------------------------


def test_providers_prefer_cuda_then_cpu(caplog: pytest.LogCaptureFixture) -> None:
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers_for("auto", both) == both
    assert providers_for("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert providers_for("cpu", both) == ["CPUExecutionProvider"]
    with caplog.at_level(logging.WARNING):
        assert providers_for("cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert "CUDA requested" in caplog.text


@slow
def test_one_log_line_names_the_provider_used(caplog: pytest.LogCaptureFixture) -> None:
    model_dir = exported_model_dir()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clinragen_fhir.inference.runtime"):
        model = OnnxModel(model_dir, "fp32", "auto", threads=1)
    lines = [r for r in caplog.records if "ExecutionProvider" in r.getMessage()]
    assert len(lines) == 1 and model.provider in lines[0].getMessage()
    assert model.provider == "CPUExecutionProvider"  # this CI has no GPU


# -- decoding ----------------------------------------------------------------------------------


def test_constraint_keeps_the_diagnosis_line_to_vocabulary_codes() -> None:
    """A step function that always prefers a junk code still yields a valid line."""
    pieces = ["", "<eos>", " Diagnosis:", " 12345678", " 44054006", ";", " 38341003", " none",
              " the", " 4405"]
    eos, junk = 1, 3
    prefs = np.array([0, 0, 1, 9, 2, 3, 4, 1, 8, 5], dtype=np.float32)

    def step(embeds: np.ndarray, mask: np.ndarray, pos: np.ndarray,
             past: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        logits = np.tile(prefs, (embeds.shape[0], 1))
        logits[:, 2] = 20.0 if mask.shape[1] == 3 else -5  # write the label first, once
        return logits, []

    c = DiagnosisConstraint(pieces, ["44054006", "38341003"], eos)
    out = greedy(step, lambda ids: np.zeros((len(ids), 4), np.float32),
                 np.zeros((2, 3, 4), np.float32), np.ones((2, 3)), 12, eos, eos, c)
    text = "".join(pieces[t] for t in out.ids[0])
    assert junk not in out.ids[0] and 9 not in out.ids[0]  # " 4405": no token completes it
    assert text.startswith(" Diagnosis:") and out.ids[0, -1] == eos
    assert split_output(text, set(CODES))[1] == ["38341003", "44054006"]


def test_constraint_forces_the_label_when_the_budget_runs_out() -> None:
    pieces = ["", "<eos>", " Diagnosis:", " 44054006", " the"]

    def step(embeds: np.ndarray, mask: np.ndarray, pos: np.ndarray,
             past: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        return np.tile(np.array([0, 0, 0, 1, 5], np.float32), (embeds.shape[0], 1)), []

    c = DiagnosisConstraint(pieces, ["44054006"], 1, label_ids=[2], reserve=3)
    out = greedy(step, lambda ids: np.zeros((len(ids), 4), np.float32),
                 np.zeros((1, 2, 4), np.float32), np.ones((1, 2)), 8, 1, 1, c)
    assert "".join(pieces[t] for t in out.ids[0]) == \
        " the the the the the Diagnosis: 44054006<eos>"


@slow
def test_batched_generation_equals_one_patient_at_a_time(predictor: OnnxPredictor) -> None:
    model = predictor.model
    feats = [predictor.featurise(*p)[0] for p in patients(3)]
    together = model.generate(collate(feats), 6)
    for i, f in enumerate(feats):
        alone = model.generate(collate([f]), 6)
        assert alone.texts[0] == together.texts[i]
        assert np.abs(alone.probabilities[0] - together.probabilities[i]).max() < 1e-5


@slow
def test_generated_diagnosis_lines_hold_only_vocabulary_codes(predictor: OnnxPredictor) -> None:
    model = predictor.model
    feats = [predictor.featurise(*p)[0] for p in patients(8)]
    gen = model.generate(collate(feats), 12, constrained=True)
    for text in gen.texts:
        assert "Diagnosis:" in text
        line = text[text.rindex("Diagnosis:") + len("Diagnosis:"):]
        assert all(w.strip(";") in {*CODES, "none", ""} for w in line.split()), text


# -- the Predictor -----------------------------------------------------------------------------


@slow
def test_predictor_gives_a_prediction_with_head_probabilities_and_evidence(
        predictor: OnnxPredictor) -> None:
    labs, notes, patient = patients(4)[3]
    p = predictor.predict(labs, notes, patient)
    assert p.method == "clinragen-onnx" and p.knowledge_version == graph().version
    feats, _ = predictor.featurise(labs, notes, patient)
    assert set(p.facts_used) <= {f.id for f in feats.facts} and p.facts_used
    gen = predictor.model.generate(collate([feats]))
    probs = dict(zip(predictor.model.config.disorders, gen.probabilities[0], strict=True))
    for dx in p.diagnoses:
        assert dx.probability == pytest.approx(float(probs[dx.snomed]))
        assert all(e.reference.startswith("Observation/p3") for e in dx.evidence)
    assert not p.abstained or p.abstain_reason


@slow
def test_a_diagnosis_cites_only_readings_of_tests_that_bear_on_it() -> None:
    """With every threshold at 0 the tiny model concludes its cap: each diagnosis's evidence is
    readings of its own supporting tests (never the most abnormal unrelated ones)."""
    p = OnnxPredictor.load(exported_model_dir(), graph(), provider="cpu", threads=1)
    p.model.config = dataclasses.replace(p.model.config, threshold=0.0, thresholds={},
                                         min_confidence=0.0)
    concluded = 0
    for labs, notes, patient in patients(4):
        for dx in p.predict(labs, notes, patient).diagnoses:
            concluded += 1
            tests = supporting_tests(p.kg, dx.snomed)
            assert all(e.loinc in tests for e in dx.evidence if e.loinc), dx
    assert concluded > 0


def test_without_a_finding_the_evidence_is_the_newest_reading_of_each_supporting_test() -> None:
    def reading(oid: str, loinc: str, value: float, day: int) -> Reading:
        return Reading(f"Observation/{oid}", "1", loinc, loinc, value, "", f"2024-03-{day:02d}")

    labs = [reading("a1", "4548-4", 5.9, 1), reading("a2", "4548-4", 6.1, 9),
            reading("g1", "2339-0", 130.0, 5), reading("k1", "2160-0", 9.9, 20)]
    got = supporting_readings(labs, frozenset({"4548-4", "2339-0"}))
    assert [r.observation_id for r in got] == ["Observation/a2", "Observation/g1"]
    assert supporting_readings(labs, frozenset({"8480-6"})) == []
    assert len(supporting_readings(labs * 2, frozenset({"4548-4", "2339-0", "2160-0"}), k=2)) == 2


@slow
def test_the_model_reads_notes_with_every_disorder_name_masked(predictor: OnnxPredictor) -> None:
    """Training masked every disorder name (knowledge.masking); the worker hands the model the
    same view, so a note naming diabetes gives the features of the masked note."""
    labs, _, patient = patients(2)[1]
    named = Note("DocumentReference/n1", "1", datetime(2024, 3, 1, tzinfo=UTC),
                 "Diabetes mellitus type 2: the patient reports thirst")
    masked = Note(named.document_id, "1", named.time, f"{MASK}: the patient reports thirst")
    a, ra = predictor.featurise(labs, [named], patient)
    b, rb = predictor.featurise(labs, [masked], patient)
    for key in ("note_ids", "note_bag_ids", "note_bag_weight", "fact_ids"):
        assert np.array_equal(getattr(a, key), getattr(b, key)), key
    assert ra.note_mentions == rb.note_mentions
    assert "Diabetes" not in predictor.model.tokenizer.decode(a.note_ids.tolist())


@slow
def test_predict_batch_abstains_on_an_empty_patient(predictor: OnnxPredictor) -> None:
    labs, notes, patient = patients(1)[0]
    out = predictor.predict_batch([(labs.iloc[:0], [], patient), (labs, notes, patient)])
    assert out[0].abstained and out[0].abstain_reason == "no usable lab results or notes"
    assert out[1].method == "clinragen-onnx"


# -- bad model directories and inputs ----------------------------------------------------------


def test_missing_model_dir_names_it(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match=r"does not exist") as exc:
        OnnxModel(tmp_path / "nowhere")
    assert exc.value.path == tmp_path / "nowhere"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable, match=r"manifest.json: missing: export the model"):
        OnnxModel(tmp_path / "empty")


@slow
def test_truncated_graph_is_refused_naming_the_file(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    graph_file = d / "onnx" / "decoder.onnx"
    graph_file.write_bytes(graph_file.read_bytes()[:1000])
    with pytest.raises(ModelUnavailable, match=r"decoder.onnx: .*bytes, the manifest says"):
        OnnxModel(d)


@slow
def test_same_size_corruption_is_caught_by_the_hash(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    f = d / "onnx" / "prefix.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ModelUnavailable, match=r"prefix.onnx: sha256 differs"):
        OnnxModel(d)


@slow
def test_manifest_from_another_version_is_refused(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    path = d / "onnx" / "manifest.json"
    m = json.loads(path.read_text())
    path.write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(ModelUnavailable, match=r"manifest.json: format version 99, this runtime"):
        OnnxModel(d)


@slow
def test_graphs_of_another_model_are_refused(tmp_path: Path) -> None:
    """A retrained config.json beside old graphs: the manifest's hash no longer matches."""
    d = copy_model(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "temperature": 2.0}))
    with pytest.raises(ModelUnavailable, match=r"config.json: .*from another export"):
        OnnxModel(d)


@slow
def test_missing_int8_variant_is_named(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    path = d / "onnx" / "manifest.json"
    m = json.loads(path.read_text())
    del m["variants"]["int8"]
    path.write_text(json.dumps(m))
    with pytest.raises(ModelUnavailable, match=r"no 'int8' variant"):
        OnnxModel(d, "int8")


@slow
def test_input_longer_than_exported_names_the_file_and_limit(predictor: OnnxPredictor,
                                                              tmp_path: Path) -> None:
    model = predictor.model
    arrays = collate([predictor.featurise(*patients(1)[0])[0]])
    arrays["note_ids"] = np.zeros((1, 385), dtype=np.int64)
    with pytest.raises(InputTooLong, match=r"note tokens is 385, over the limit of 384 declared "
                                           r"by .*manifest.json"):
        model.check(arrays, 4)
    arrays = collate([predictor.featurise(*patients(1)[0])[0]])
    arrays["note_bag_ids"] = np.zeros((1, 65), dtype=np.int64)
    with pytest.raises(InputTooLong, match=r"distinct note tokens is 65, over the limit of 64"):
        model.check(arrays, 4)
    arrays["note_bag_ids"] = np.full((1, 3), 10**6, dtype=np.int64)  # would crash the Gather
    with pytest.raises(InputTooLong, match=r"note token id is 1000000"):
        model.check(arrays, 4)
    d = copy_model(tmp_path)  # a backbone with a short context
    path = d / "onnx" / "manifest.json"
    m = json.loads(path.read_text())
    m["limits"]["max_positions"] = 60
    path.write_text(json.dumps(m))
    short = OnnxModel(d, provider="cpu")
    arrays = collate([predictor.featurise(*patients(1)[0])[0]])
    with pytest.raises(InputTooLong, match=r"prefix \+ new tokens is .*, over the limit of "
                                           r"60 declared by .*decoder.onnx"):
        short.generate(arrays, 30)


# -- the worker's choice -----------------------------------------------------------------------


def test_no_model_dir_means_the_plain_rule_baseline() -> None:
    assert isinstance(build_predictor(None, graph()), RuleBaseline)


def test_broken_model_dir_falls_back_and_the_report_says_so(tmp_path: Path) -> None:
    pred = build_predictor(tmp_path / "missing", graph())
    assert isinstance(pred, ModelOrBaseline) and pred.model is None
    labs, notes, patient = patients(1)[0]
    p = pred.predict(labs, notes, patient)
    assert p.method == "knowledge-rule-baseline"
    assert p.rationale.startswith("Note: the ClinRaGen model was not used (missing: model "
                                  "directory does not exist)")


@slow
def test_configured_model_dir_runs_the_onnx_model_and_long_inputs_fall_back() -> None:
    from clinragen_fhir.config import InferenceSettings

    pred = build_predictor(exported_model_dir(), graph(), InferenceSettings(provider="cpu"))
    assert pred.name == "clinragen-onnx"
    labs, notes, patient = patients(2)[1]
    assert pred.predict(labs, notes, patient).method == "clinragen-onnx"
    too_long = build_predictor(exported_model_dir(), graph(), InferenceSettings(
        provider="cpu", max_new_tokens=100_000))
    p = too_long.predict(labs, notes, patient)
    assert p.method == "knowledge-rule-baseline"
    assert "new tokens is 100000, over the limit of 512 (manifest.json)" in p.rationale

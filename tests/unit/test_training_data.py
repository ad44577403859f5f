"""Datasets from FHIR: index times, labels after, inputs before, no label leakage, splits."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from click.testing import CliRunner

from clinragen_fhir.encoding.schema import Note
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.knowledge import KnowledgeGraph, load_graph
from clinragen_fhir.knowledge.masking import MASK, ROOTS
from clinragen_fhir.knowledge.retrieval import find_mentions
from training.data import (
    BuildConfig,
    Source,
    build_dataset,
    disorder_events,
    encode_record,
    examples_for_patient,
    load_split,
    read_dataset_manifest,
    source_from_spec,
    split_of,
)
from training.data_cli import build
from training.example import read_examples
from training.leakage import leaked_terms, mask_notes
from training.sources import iter_bundle_records, iter_ndjson_records, iter_server_records
from training.vocabulary import revealable_disorders

T2DM, DM, PREDIABETES, HTN = "44054006", "73211009", "714628002", "59621000"


@pytest.fixture(scope="module")
def kg() -> KnowledgeGraph:
    return load_graph()


# ---------------------------------------------------------------------------------------------
# hand-made patients


def _note(rid: str, when: str, text: str) -> dict[str, Any]:
    return {"resourceType": "DocumentReference", "id": rid, "status": "current",
            "subject": {"reference": "Patient/p1"}, "date": when,
            "content": [{"attachment": {"contentType": "text/plain",
                                        "data": base64.b64encode(text.encode()).decode()}}]}


def _a1c(rid: str, when: str, value: float) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": rid, "status": "final",
            "category": [{"coding": [{"code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
            "subject": {"reference": "Patient/p1"}, "effectiveDateTime": when,
            "valueQuantity": {"value": value, "unit": "%", "code": "%"}}


def _condition(rid: str, system: str, code: str, onset: str,
               recorded: str | None = None, abated: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"resourceType": "Condition", "id": rid,
                         "subject": {"reference": "Patient/p1"},
                         "code": {"coding": [{"system": system, "code": code}]},
                         "onsetDateTime": onset}
    if recorded:
        c["recordedDate"] = recorded
    if abated:
        c["abatementDateTime"] = abated
    return c


SCT_SYS, ICD_SYS = "http://snomed.info/sct", "http://hl7.org/fhir/sid/icd-10-cm"


def patient_resources() -> list[dict[str, Any]]:
    """Hypertension known since 2015; HbA1c rising 2022-2023; type 2 diabetes (ICD-10-CM
    E11.9, re-recorded at a later snapshot) from 2023-06-01; a note that names it early."""
    return [
        {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1960-01-01"},
        _a1c("a1", "2022-06-01T10:00:00Z", 6.0), _a1c("a2", "2023-01-01T10:00:00Z", 6.3),
        _a1c("a3", "2023-06-01T10:00:00Z", 7.4),  # same time as the diagnosis: not an input
        _note("n1", "2022-06-01T10:05:00Z",
              "Known hypertension. Family worried about Type 2 Diabetes Mellitus; T2DM risk."),
        _note("n2", "2023-01-01T10:05:00Z", "Prediabetes range; diabetes\nmellitus discussed."),
        _note("n3", "2023-06-01T10:00:00Z", "Assessment: type 2 diabetes mellitus."),
        _condition("c1", SCT_SYS, HTN, "2015-03-01T00:00:00Z"),
        _condition("c2", ICD_SYS, "E11.9", "2023-06-01T10:00:00Z",
                   recorded="2026-01-31T00:00:00Z"),
        _condition("c3", SCT_SYS, "105531004", "2020-01-01T00:00:00Z"),  # social finding
    ]


def write_bundle(path: Path, resources: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "transaction",
                                "entry": [{"resource": r} for r in resources]}))
    return path


def test_icd10_conditions_map_to_graph_disorders_dated_by_onset(kg: KnowledgeGraph) -> None:
    events = disorder_events([r for r in patient_resources()
                              if r["resourceType"] == "Condition"], kg)
    assert [(e.snomed, e.time.date().isoformat()) for e in events] == [
        (HTN, "2015-03-01"), (T2DM, "2023-06-01")]  # onset, not the 2026 re-recording
    refuted = _condition("x", SCT_SYS, HTN, "2016-01-01")
    refuted["verificationStatus"] = {"coding": [{"code": "refuted"}]}
    assert disorder_events([refuted], kg) == []


def test_examples_cut_inputs_before_and_labels_after(kg: KnowledgeGraph, tmp_path: Path) -> None:
    (record,) = iter_bundle_records([write_bundle(tmp_path / "p.json", patient_resources())])
    cfg = BuildConfig(seed=3, random_per_patient=0, mode="onset")
    (ex,) = examples_for_patient(encode_record(record, kg), kg, cfg, "hand")
    index = pd.Timestamp("2023-06-01T10:00:00Z")
    assert ex.patient.index_time == index.to_pydatetime()
    assert ex.meta["index_kind"] == "onset"
    # the HbA1c of the diagnosing visit (same timestamp) and its note are not inputs
    assert sorted(ex.labs["observation_id"]) == ["Observation/a1", "Observation/a2"]
    assert [n.document_id for n in ex.notes] == ["DocumentReference/n1", "DocumentReference/n2"]
    # labels: type 2 diabetes and its ancestors, never the root, never the known hypertension
    assert T2DM in ex.labels and DM in ex.labels
    assert not set(ex.labels) & ROOTS
    assert HTN not in ex.labels and HTN in ex.meta["prior_disorders"]
    assert ex.meta["label_days"][T2DM] == 0.0
    # leakage: the diabetes mentions are masked (any case, across a line break, abbreviation),
    # the known hypertension is context and stays
    text = "\n".join(n.text for n in ex.notes)
    assert "hypertension" in text
    assert leaked_terms(kg, text, ex.labels) == []
    assert text.count(MASK) == 4 and ex.meta["masked_mentions"] == 4
    assert not [m for m in find_mentions(kg, ex.notes) if m.code in ex.labels]
    # the diagnosing visit's results become inputs on request; its note never does
    (visit,) = examples_for_patient(encode_record(record, kg), kg,
                                    BuildConfig(seed=3, random_per_patient=0,
                                                visit_lab_hours=1, mode="onset"), "hand")
    assert sorted(visit.labs["observation_id"])[-1] == "Observation/a3"
    assert visit.meta["visit_labs"] == 1 and len(visit.notes) == 2
    assert visit.labels == ex.labels


def test_visit_examples_answer_the_workers_question(kg: KnowledgeGraph, tmp_path: Path) -> None:
    """One example per visit: its own results are inputs, its labels are the revealable
    disorders active at its end, the new ones are marked, every disorder name is masked."""
    (record,) = iter_bundle_records([write_bundle(tmp_path / "p.json", patient_resources())])
    examples = examples_for_patient(encode_record(record, kg), kg, BuildConfig(seed=3), "hand")
    assert [e.meta["index_kind"] for e in examples] == ["visit"] * 3
    last = examples[-1]
    assert sorted(last.labs["observation_id"]) == [f"Observation/a{i}" for i in (1, 2, 3)]
    assert last.meta["visit_labs"] == 1
    assert [n.document_id for n in last.notes][-1] == "DocumentReference/n3"
    assert {T2DM, DM, HTN} <= set(last.labels)
    assert set(last.meta["new_labels"]) == {T2DM, DM}  # hypertension was known before
    assert set(last.labels) <= revealable_disorders(kg)  # the social finding is no label
    first = examples[0]
    assert HTN in first.labels and T2DM not in first.labels and first.meta["new_labels"] == []
    for ex in examples:
        text = "\n".join(n.text for n in ex.notes)
        assert "hypertension" not in text.lower() and "diabet" not in text.lower()
        assert leaked_terms(kg, text, kg.disorders()) == []
        assert all(t <= pd.Timestamp(ex.patient.index_time) for t in ex.labs["time"])
    # a seeded sample bounds the visits per patient
    (one,) = examples_for_patient(encode_record(record, kg), kg,
                                  BuildConfig(seed=3, max_visits_per_patient=1), "hand")
    assert one.example_id in {e.example_id for e in examples}


def test_window_bounds_the_labels(kg: KnowledgeGraph, tmp_path: Path) -> None:
    (record,) = iter_bundle_records([write_bundle(tmp_path / "p.json", patient_resources())])
    enc = encode_record(record, kg)
    cfg = BuildConfig(random_per_patient=3, window_days=30, seed=1, max_onset_per_patient=0,
                      mode="onset")
    examples = examples_for_patient(enc, kg, cfg, "hand")
    assert examples and all(e.meta["index_kind"] == "random" for e in examples)
    for e in examples:
        assert e.patient.index_time is not None
        index = pd.Timestamp(e.patient.index_time)
        in_window = pd.Timestamp("2023-06-01T10:00:00Z") - index < timedelta(days=30)
        assert (T2DM in e.labels) == (index <= pd.Timestamp("2023-06-01T10:00:00Z")
                                      and in_window)
        assert len(e.labs) >= cfg.min_prior_labs
        assert all(t < index for t in e.labs["time"])


def test_drop_policy_and_label_scope(kg: KnowledgeGraph) -> None:
    notes = [Note("DocumentReference/a", "1", None, "Anemia noted."),
             Note("DocumentReference/b", "1", None, "Gout flare; no anaemia."),
             Note("DocumentReference/c", "1", None, "Gout flare.")]
    dropped = mask_notes(kg, notes, ["271737000"], policy="drop")
    assert [n.document_id for n in dropped.notes] == ["DocumentReference/c"]
    assert dropped.dropped_notes == 2  # "anaemia" is a synonym; negated mentions count too
    # a label is named by the terms of its descendants too
    assert "44054006" in kg.descendants(DM)
    assert leaked_terms(kg, "t2dm since 2019", [DM]) == ["t2dm"]
    with pytest.raises(ValueError, match="leak policy"):
        mask_notes(kg, notes, [], policy="keep")


def test_ndjson_and_server_sources_give_the_same_examples(kg: KnowledgeGraph,
                                                          tmp_path: Path) -> None:
    resources = patient_resources()
    folder = tmp_path / "bulk"
    folder.mkdir()
    for rtype in ("Condition", "Observation", "Patient", "DocumentReference"):  # Patient later
        (folder / f"{rtype}.ndjson").write_text("".join(
            json.dumps(r) + "\n" for r in resources if r["resourceType"] == rtype))
    (rec_nd,) = iter_ndjson_records(folder)

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path.rstrip("/").split("/")[-1]
        if path == "p1":
            return httpx.Response(200, json=resources[0])
        wanted = [r for r in resources if r["resourceType"] == path]
        assert request.url.params["patient"] == "p1"
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset",
                                         "entry": [{"resource": r} for r in wanted]})

    client = FhirClient("http://127.0.0.1:1/fhir", transport=httpx.MockTransport(handler))
    (rec_srv,) = iter_server_records(client, ["p1"])
    cfg = BuildConfig(seed=5)
    a = examples_for_patient(encode_record(rec_nd, kg), kg, cfg, "s")
    b = examples_for_patient(encode_record(rec_srv, kg), kg, cfg, "s")
    assert a[0].meta.pop("origin") == "bulk" and b[0].meta.pop("origin").startswith("fhir:")
    assert a and [e.to_json() for e in a[:1]] == [e.to_json() for e in b[:1]]
    assert [e.example_id for e in a] == [e.example_id for e in b]
    assert source_from_spec(folder).kind == "ndjson"


def test_splits_are_by_patient_seeded_and_stable() -> None:
    ids = [f"p{i}" for i in range(2000)]
    splits = [split_of(0, "src", i) for i in ids]
    share = {s: splits.count(s) / len(ids) for s in ("train", "valid", "test")}
    assert share["train"] == pytest.approx(0.7, abs=0.04)
    assert share["valid"] == pytest.approx(0.15, abs=0.03)
    assert splits == [split_of(0, "src", i) for i in ids]  # deterministic
    assert splits != [split_of(1, "src", i) for i in ids]  # seeded


# ---------------------------------------------------------------------------------------------
# the real Synthea records


@pytest.fixture(scope="module")
def real_dataset(kg: KnowledgeGraph, data_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds")
    build_dataset([data_dir], out, kg=kg, progress=False,
                  config=BuildConfig(seed=11, mode="onset"))
    return out


@pytest.mark.slow
def test_real_records_no_label_term_in_any_input_note(kg: KnowledgeGraph,
                                                      real_dataset: Path) -> None:
    manifest = read_dataset_manifest(real_dataset)
    n_examples = n_notes = 0
    for split in ("train", "valid", "test"):
        for ex in load_split(real_dataset, split):
            n_examples += 1
            labels = set(ex.labels)
            names = labels.union(*(kg.descendants(c) for c in labels))
            for note in ex.notes:
                n_notes += 1
                assert leaked_terms(kg, note.text, labels) == [], ex.example_id
            assert not [m for m in find_mentions(kg, ex.notes) if m.code in names], \
                ex.example_id
    assert n_examples == sum(c["examples"] for c in manifest.counts.values()) > 500
    assert n_notes > 1000
    # masking really happened (the check above is not vacuous)
    assert manifest.leakage["masked_mentions"] > 100


@pytest.mark.slow
def test_real_records_inputs_precede_index_and_splits_hold(real_dataset: Path) -> None:
    manifest = read_dataset_manifest(real_dataset)
    patients: dict[str, str] = {}
    onset_with_same_day_label = 0
    for split in ("train", "valid", "test"):
        examples = load_split(real_dataset, split)
        assert len(examples) == manifest.counts[split]["examples"]
        for ex in examples:
            assert ex.patient.index_time is not None
            index = pd.Timestamp(ex.patient.index_time)
            assert ex.split == split
            assert patients.setdefault(ex.patient.patient_id, split) == split
            assert all(t < index for t in ex.labs["time"])
            assert all(n.time is not None and pd.Timestamp(n.time) < index for n in ex.notes)
            assert not set(ex.labels) & set(ex.meta["prior_disorders"])
            assert all(0 <= d < 365 for d in ex.meta["label_days"].values())
            if ex.meta["index_kind"] == "onset":
                onset_with_same_day_label += min(ex.meta["label_days"].values()) == 0
    assert onset_with_same_day_label == manifest.index_kinds["onset"]
    assert set(manifest.counts) == {"train", "valid", "test"}
    assert manifest.sources[0]["files"] == 177 and len(manifest.sources[0]["sha256"]) == 64
    assert manifest.positives["271737000"]["total"] > 5  # anemia


def test_cli_build_is_reproducible(data_dir: Path, tmp_path: Path) -> None:
    args = ["--source", f"syn={data_dir / 'california'}", "--max-patients", "6", "--quiet"]
    runner = CliRunner()
    for out in ("a", "b"):
        result = runner.invoke(build, [*args, "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
    for split in ("train", "valid", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == \
            (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    examples = list(read_examples(tmp_path / "a" / "train.jsonl"))
    assert examples and all(e.source == "syn" for e in examples)
    assert read_dataset_manifest(tmp_path / "a").config["max_patients"] == 6


def test_source_needs_something_to_read() -> None:
    with pytest.raises(ValueError, match="nothing to read"):
        next(Source("x", "fhir").records())

"""The runtime hides disorder names from the model's notes exactly as training did."""

from __future__ import annotations

from datetime import UTC, datetime

from clinragen_fhir.encoding.schema import Note
from clinragen_fhir.knowledge.masking import MASK, ROOTS, every_disorder, mask_disorder_names
from tests.unit.onnx_fixtures import graph
from training.leakage import leaked_terms, mask_notes, masked_codes

TEXTS = [
    "Patient has Type 2 Diabetes Mellitus and essential\nhypertension; no fever.",
    "HYPERTENSION follow-up. Reports thirst.",
    "anemia (disorder) noted; prediabetes discussed",
    "the patient reports thirst",
]


def _notes(texts: list[str]) -> list[Note]:
    return [Note(f"DocumentReference/n{i}", "1", datetime(2024, 3, 1, tzinfo=UTC), t)
            for i, t in enumerate(texts)]


def test_every_disorder_name_is_masked_whatever_its_case_and_line_breaks() -> None:
    kg = graph()
    out = mask_disorder_names(kg, _notes(TEXTS))
    codes = sorted(every_disorder(kg))
    for note in out:
        assert leaked_terms(kg, note.text, codes) == [], note.text
    assert out[0].text.count(MASK) >= 2 and "no fever" in out[0].text
    assert out[1].text == f"{MASK} follow-up. Reports thirst."
    assert out[3].text == TEXTS[3]  # nothing named, nothing changed


def test_masking_is_idempotent_and_keeps_the_note_identity() -> None:
    kg = graph()
    once = mask_disorder_names(kg, _notes(TEXTS))
    twice = mask_disorder_names(kg, once)
    assert [n.text for n in twice] == [n.text for n in once]
    assert [(n.document_id, n.version_id, n.time) for n in once] == \
        [(n.document_id, n.version_id, n.time) for n in _notes(TEXTS)]


def test_the_runtime_mask_is_the_training_examples_mask() -> None:
    kg = graph()
    notes = _notes(TEXTS)
    trained = mask_notes(kg, notes, masked_codes(kg, [], [], "unknown")).notes  # visit examples
    assert [n.text for n in mask_disorder_names(kg, notes)] == [n.text for n in trained]
    assert not ROOTS & every_disorder(kg)

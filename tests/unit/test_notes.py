"""Note decoding: real Synthea notes, HTML, bad base64, odd charsets, huge attachments."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from clinragen_fhir.encoding import notes as notes_mod
from clinragen_fhir.encoding.notes import extract_notes, html_to_text
from tests.conftest import read_bundle


def docref(rid: str, data: bytes | str | None, ctype: str = "text/plain",
           status: str = "current", **extra: Any) -> dict[str, Any]:
    att: dict[str, Any] = {"contentType": ctype}
    if data is not None:
        att["data"] = data if isinstance(data, str) else base64.b64encode(data).decode()
    else:
        att["url"] = "Binary/1"
    return {"resourceType": "DocumentReference", "id": rid, "status": status,
            "content": [{"attachment": att}], "date": "2024-01-02T03:04:05Z", **extra}


def test_real_synthea_notes_decode(patient_bundles: list[Path]) -> None:
    bundle = read_bundle(patient_bundles[0])
    docs = [e["resource"] for e in bundle["entry"]
            if e["resource"]["resourceType"] == "DocumentReference"]
    notes, skips = extract_notes(docs)
    assert len(notes) == len(docs) and not skips
    assert all("# Chief Complaint" in n.text for n in notes)
    assert [n.time for n in notes] == sorted(n.time for n in notes if n.time)
    assert notes[0].type_code == "34117-2"


def test_html_is_stripped_to_text() -> None:
    markup = b"<html><style>p{}</style><p>Denies <b>chest pain</b>.</p><p>BP 150/95&nbsp;</p>"
    notes, _ = extract_notes([docref("h", markup, "text/html")])
    assert "Denies chest pain." in notes[0].text and "<b>" not in notes[0].text
    assert "p{}" not in notes[0].text
    assert html_to_text("<div>a</div><div>b</div>").split() == ["a", "b"]


def test_non_utf8_bytes_are_replaced_not_fatal() -> None:
    notes, skips = extract_notes([docref("x", b"caf\xe9 \xff ok")])
    assert not skips and notes[0].text.endswith("ok")
    latin, _ = extract_notes([docref("l", "café".encode("latin-1"), "text/plain; charset=latin-1")])
    assert latin[0].text == "café"


def test_unusable_documents_are_skipped_with_reasons() -> None:
    docs = [
        docref("url", None),
        docref("pdf", b"%PDF", "application/pdf"),
        docref("err", b"text", status="entered-in-error"),
        docref("empty", b"   "),
        {"resourceType": "DocumentReference", "id": "bad", "status": "current", "content": "x"},
        docref("dup", b"one"),
        docref("dup", b"one"),
    ]
    notes, skips = extract_notes(docs)
    reasons = {s.reference: s.reason for s in skips}
    assert [n.document_id for n in notes] == ["DocumentReference/dup"]
    assert "URL" in reasons["DocumentReference/url"]
    assert "not text" in reasons["DocumentReference/pdf"]
    assert "error" in reasons["DocumentReference/err"]
    assert "empty" in reasons["DocumentReference/empty"]
    assert "malformed" in reasons["DocumentReference/bad"]
    assert "duplicate" in reasons["DocumentReference/dup"]


def test_huge_note_is_bounded() -> None:
    big = b"x" * (5 * 1024 * 1024)
    notes, skips = extract_notes([docref("big", big)])
    assert not skips and len(notes[0].text) == notes_mod.MAX_NOTE_CHARS
    too_big = "A" * (notes_mod.MAX_ATTACHMENT_BYTES * 2)
    notes, skips = extract_notes([docref("huge", too_big)])
    assert not notes and "larger than" in skips[0].reason

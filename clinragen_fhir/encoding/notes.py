"""DocumentReferences -> note texts: base64 text/plain as is, text/html stripped to text.

Sizes are bounded before decoding so a huge attachment cannot exhaust a worker's memory, and in
total: the newest notes are kept up to MAX_NOTES_TOTAL_CHARS, each older one recorded as a Skip.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any, ClassVar

from fhir.resources.R4B.documentreference import DocumentReference

from clinragen_fhir.encoding.schema import Note, Skip
from clinragen_fhir.encoding.validated import validated
from clinragen_fhir.fhir.resources import LOINC, codes, to_utc, version_of

MAX_ATTACHMENT_BYTES = 8 * 1024 * 1024  # decoded size beyond which a note is skipped
MAX_NOTE_CHARS = 100_000  # longer notes are cut (the model reads far less than this)
# All notes of one patient, newest first: the model reads a few hundred tokens of the newest,
# but retrieval scans every kept note, so this bounds its time and the worker's memory.
MAX_NOTES_TOTAL_CHARS = 1_000_000
_UNDATED = datetime.min.replace(tzinfo=UTC)
TEXT_TYPES = ("text/plain", "text/html", "application/xhtml+xml")


class _TextExtractor(HTMLParser):
    """Collects text, dropping script/style, with line breaks at block elements."""

    _BLOCK: ClassVar[set[str]] = {"p", "div", "br", "li", "tr", "section",
                                  "h1", "h2", "h3", "h4", "h5", "h6"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = html.unescape("".join(parser.parts))
    return re.sub(r"[ \t]+", " ", re.sub(r"\n\s*\n+", "\n\n", text)).strip()


def _charset(content_type: str) -> str:
    match = re.search(r"charset=([\w.-]+)", content_type, re.I)
    return match.group(1) if match else "utf-8"


def _decode(data_b64: str, content_type: str) -> str:
    raw = base64.b64decode(data_b64, validate=False)
    try:
        text = raw.decode(_charset(content_type), errors="replace")
    except LookupError:  # unknown charset name
        text = raw.decode("utf-8", errors="replace")
    return html_to_text(text) if "html" in content_type else text


def _newest_within(notes: list[Note], budget: int, skips: list[Skip]) -> list[Note]:
    """The newest notes (undated ones last) while their texts fit in `budget` characters; a
    Skip for each older one."""
    ranked = sorted(notes, key=lambda n: (n.time is not None, n.time or _UNDATED), reverse=True)
    kept: list[Note] = []
    total = 0
    for i, note in enumerate(ranked):
        if total + len(note.text) > budget:
            skips += [Skip(n.document_id, f"older than the newest notes within {budget} "
                                          "characters in all") for n in ranked[i:]]
            break
        kept.append(note)
        total += len(note.text)
    return kept


def extract_notes(documents: Iterable[dict[str, Any]], since: datetime | None = None,
                  max_total_chars: int = MAX_NOTES_TOTAL_CHARS) -> tuple[list[Note], list[Skip]]:
    """The text of each DocumentReference's first text attachment (base64 decoded, HTML
    stripped); record why the others are unused.

    Notes dated before `since` (the lookback window) are skipped, and the newest kept up to
    `max_total_chars` in all; `documents` may be a stream (a search generator): what is held
    stays within twice that bound however many documents come.
    """
    notes: list[Note] = []
    skips: list[Skip] = []
    held = 0
    after = to_utc(since) if since is not None else None
    for ref, doc in validated(documents, DocumentReference, "DocumentReference", skips):
        if doc.status == "entered-in-error" or doc.docStatus == "entered-in-error":
            skips.append(Skip(ref, "entered in error"))
            continue
        reason = "no text attachment"
        text: str | None = None
        for content in doc.content or []:
            att = content.attachment
            ctype = (att.contentType or "text/plain").lower()
            if not ctype.startswith(TEXT_TYPES):
                reason = f"attachment type {ctype} is not text"
                continue
            if att.data is None:
                reason = "attachment given by URL only (not fetched)"
                continue
            data = att.data if isinstance(att.data, str) else base64.b64encode(att.data).decode()
            if len(data) * 3 // 4 > MAX_ATTACHMENT_BYTES:
                reason = f"attachment larger than {MAX_ATTACHMENT_BYTES // (1024 * 1024)} MiB"
                continue
            try:
                text = _decode(data, ctype)
            except (binascii.Error, ValueError):
                reason = "attachment is not valid base64"
                continue
            break
        if text is None:
            skips.append(Skip(ref, reason))
            continue
        if not text.strip():
            skips.append(Skip(ref, "empty note"))
            continue
        when = to_utc(doc.date or (doc.context.period.start
                                   if doc.context and doc.context.period else None))
        if after is not None and when is not None and when < after:
            skips.append(Skip(ref, f"dated before the lookback window ({after.date()})"))
            continue
        type_codes = codes(doc.type, LOINC)
        notes.append(Note(document_id=ref, version_id=version_of(doc),
                          time=when.to_pydatetime() if when is not None else None,
                          text=text[:MAX_NOTE_CHARS],
                          type_code=type_codes[0] if type_codes else ""))
        held += len(notes[-1].text)
        if held > 2 * max_total_chars:  # prune as they come: a stream is never held whole
            notes = _newest_within(notes, max_total_chars, skips)
            held = sum(len(n.text) for n in notes)
    notes = _newest_within(notes, max_total_chars, skips)
    notes.sort(key=lambda n: (n.time is None, n.time))
    return notes, skips

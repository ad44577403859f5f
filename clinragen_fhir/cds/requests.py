"""What the EHR sends the CDS Hooks service, read strictly: a `patient-view` hook request and
feedback on a card. A malformed one is a BadRequest (400) whose text says what to fix and
never echoes the data."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from clinragen_fhir.cds.card import OVERRIDE_REASONS

HOOK = "patient-view"
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


_USER = re.compile(r"(Practitioner|PractitionerRole|Patient|RelatedPerson)/[A-Za-z0-9\-.]{1,64}")




def valid_id(value: Any) -> bool:
    """FHIR id syntax and no `.`/`..`: the id becomes part of a request to the FHIR server."""
    return isinstance(value, str) and _FHIR_ID.fullmatch(value) is not None and \
        value not in (".", "..") and ".." not in value


class BadRequest(ValueError):
    """A request the service refuses with 400 (the text says what to fix, never echoes data)."""


MAX_FEEDBACK = 50  # feedback items per request


def _uuid(value: Any, what: str) -> str:
    """A UUID in canonical form (`urn:uuid:` and braces, which uuid.UUID also takes, refused)."""
    if isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-"
                                               r"[0-9a-fA-F]{12}", value):
        return value.lower()
    raise BadRequest(what)


def read_hook_request(body: Mapping[str, Any]) -> tuple[str, str, str]:
    """(hookInstance, patientId, userId) of a valid patient-view request, else BadRequest."""
    if body.get("hook") != HOOK:
        raise BadRequest(f"hook must be {HOOK!r}")
    instance = _uuid(body.get("hookInstance"), "hookInstance must be a UUID")
    context = body.get("context")
    if not isinstance(context, dict):
        raise BadRequest("context must be an object")
    pid = context.get("patientId")
    if not valid_id(pid):
        raise BadRequest("context.patientId must be a FHIR id")
    user = context.get("userId", "")
    if user != "" and not (isinstance(user, str) and _USER.fullmatch(user)):
        raise BadRequest("context.userId must be a reference such as Practitioner/<id>")
    prefetch = body.get("prefetch")
    if prefetch is not None and not isinstance(prefetch, dict):
        raise BadRequest("prefetch must be an object")
    patient = (prefetch or {}).get("patient")
    if isinstance(patient, dict) and patient.get("resourceType") == "Patient" and \
            patient.get("id") not in (None, pid):
        raise BadRequest("prefetch.patient is not context.patientId")
    return instance, str(pid), str(user)


@dataclass(frozen=True)
class Feedback:
    card: str
    outcome: Literal["accepted", "overridden"]
    timestamp: str
    reason: str = ""  # override reason code (one we offered, or "other")
    comment: bool = False  # a free-text comment came with it (never stored: it may name people)
    accepted_suggestions: int = 0


_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:\d{2})")


def read_feedback(body: Mapping[str, Any]) -> list[Feedback]:
    """The feedback items of a CDS Hooks 2.0 feedback request, else BadRequest."""
    items = body.get("feedback")
    if not isinstance(items, list) or not items:
        raise BadRequest("feedback must be a non-empty list")
    if len(items) > MAX_FEEDBACK:
        raise BadRequest(f"more than {MAX_FEEDBACK} feedback items")
    out: list[Feedback] = []
    for item in items:
        if not isinstance(item, dict):
            raise BadRequest("each feedback item must be an object")
        card = _uuid(item.get("card"), "feedback card must be a card uuid")
        outcome = item.get("outcome")
        if outcome not in ("accepted", "overridden"):
            raise BadRequest("feedback outcome must be 'accepted' or 'overridden'")
        stamp = item.get("outcomeTimestamp")
        if not isinstance(stamp, str) or not _TIMESTAMP.fullmatch(stamp):
            raise BadRequest("outcomeTimestamp must be an ISO 8601 instant")
        override = item.get("overrideReason")
        reason, comment = "", False
        if override is not None:
            if outcome != "overridden" or not isinstance(override, dict):
                raise BadRequest("overrideReason belongs to an overridden outcome, as an object")
            coding = override.get("reason")
            code = coding.get("code") if isinstance(coding, dict) else None
            if coding is not None and not isinstance(code, str):
                raise BadRequest("overrideReason.reason must be a Coding")
            reason = code if code in OVERRIDE_REASONS else "other" if code else ""
            comment = bool(override.get("userComment"))
        accepted = item.get("acceptedSuggestions")
        n = len(accepted) if isinstance(accepted, list) else 0
        out.append(Feedback(card, outcome, stamp, reason, comment, n))
    return out

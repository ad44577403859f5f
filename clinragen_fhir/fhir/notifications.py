"""What a FHIR Subscription notification names: its patients, its event key, its event times.

Total over any JSON object (the reliability suite fuzzes them): R4 rest-hook payloads (the
changed resource), R4B/R5 topic-based notification Bundles and the R4 backport's `Parameters`
(`notification-event` parts: id-only and `focus` payloads name their patient through the
Bundle's resources). A patient reference that is not a plain `[base/]Patient/<FHIR id>` is
refused and counted, never followed: the id becomes a path segment of a request to the server.
The receiver (webhook.py) decides what to do with what is found here.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

# A notification with no event time counts as this long before it arrived (HAPI retries a
# delivery for about a minute): what a poll resumes from must not be later than the change.
RECEIVED_MARGIN_S = 120
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}")


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The objects in a JSON list (anything else in a notification is ignored, not a crash)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def valid_id(value: Any) -> bool:
    """FHIR id syntax, and no `..`: the id becomes a path segment of a request to the server."""
    return isinstance(value, str) and _FHIR_ID.fullmatch(value) is not None and \
        ".." not in value and value != "."


def _target(ref: str) -> tuple[str, str] | None:
    """(type, id) of a relative or absolute literal reference (a `_history` suffix dropped);
    None for anything else (conditional `Patient?identifier=`, `#contained`, `urn:`)."""
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2 or not _TYPE.fullmatch(parts[-2]):
        return None
    return parts[-2], parts[-1]


@dataclass
class Notification:
    """What a notification names: valid patient ids, the event key, and refused references."""

    patients: set[str] = field(default_factory=set)
    event: str = ""  # "Subscription/s#7,8" when every status names both; else ""
    refused: int = 0  # patient references whose id is not a FHIR id (`..`, `?query`, ...)
    numbered: dict[str, list[int]] = field(default_factory=dict)  # subscription: event numbers
    times: list[str] = field(default_factory=list)  # event timestamps, resources' lastUpdated
    heartbeat: bool = False  # a heartbeat's number is the count so far, not a new event

    def add_ref(self, ref: Any, resources: dict[str, dict[str, Any]]) -> None:
        """A reference to a Patient names it; to another resource in the Bundle, its subject.
        A patient reference that is not a plain `[base/]Patient/<FHIR id>` is refused."""
        ref = _str(ref)
        plain = "?" not in ref and "#" not in ref and not {".", ".."} & set(ref.split("/"))
        target = _target(ref) if plain else None
        if target is not None and target[0] == "Patient" and valid_id(target[1]):
            self.patients.add(target[1])
        elif target is not None and target[0] != "Patient":
            if (found := resources.get(f"{target[0]}/{target[1]}")) is not None:
                self.add_resource(found)
        elif ref.startswith("Patient") or "/Patient/" in ref or "/Patient?" in ref:
            self.refused += 1

    def add_resource(self, resource: dict[str, Any]) -> None:
        if (updated := _instant(_obj(resource.get("meta")).get("lastUpdated"))) is not None:
            self.times.append(updated)
        if resource.get("resourceType") == "Patient":
            rid = resource.get("id")
            if valid_id(rid):
                self.patients.add(str(rid))
            elif rid is not None:
                self.refused += 1
            return
        for key in ("subject", "patient"):
            ref = _str(_obj(resource.get(key)).get("reference"))
            if ref.startswith("Patient") or "/Patient/" in ref:
                self.add_ref(ref, {})
                return


def _status(resource: dict[str, Any]) -> tuple[str, list[str], list[Any]]:
    """Subscription reference, event numbers and focus/context references of one R4B/R5
    SubscriptionStatus or R4 backport Parameters (`notification-event` parts)."""
    if resource.get("resourceType") == "SubscriptionStatus":
        events = _dicts(resource.get("notificationEvent"))
        numbers = [_number(e.get("eventNumber")) for e in events]
        if not events:
            numbers = [_number(resource.get("eventsSinceSubscriptionStart"))]
        refs = [_obj(e.get("focus")).get("reference") for e in events] + [
            _obj(c).get("reference") for e in events for c in _list(e.get("additionalContext"))]
        return _str(_obj(resource.get("subscription")).get("reference")), numbers, refs
    params = _dicts(resource.get("parameter"))
    sub = ""
    numbers, refs = [], []
    for p in params:
        name = p.get("name")
        if name == "subscription":
            sub = _str(_obj(p.get("valueReference")).get("reference"))
        elif name == "notification-event":
            parts = _dicts(p.get("part"))
            numbers.append(next((_number(_value(q)) for q in parts
                                 if q.get("name") == "event-number"), ""))
            refs += [_obj(q.get("valueReference")).get("reference") for q in parts
                     if q.get("name") in ("focus", "additional-context")]
    if not numbers:
        numbers = [_number(_value(p)) for p in params
                   if p.get("name") == "events-since-subscription-start"][:1] or [""]
    return sub, numbers, refs


def _instant(value: Any) -> str | None:
    """A FHIR instant as UTC `YYYY-MM-DDTHH:MM:SS.fffZ`, or None for anything else."""
    if not isinstance(value, str) or not value[:4].isdigit() or "T" not in value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _event_times(resource: dict[str, Any]) -> tuple[list[str], bool]:
    """The event timestamps of a SubscriptionStatus or backport Parameters, and whether it is a
    heartbeat."""
    if resource.get("resourceType") == "SubscriptionStatus":
        stamps = [e.get("timestamp") for e in _dicts(resource.get("notificationEvent"))]
        beat = resource.get("type") == "heartbeat"
    else:
        params = _dicts(resource.get("parameter"))
        stamps = [_value(q) for p in params if p.get("name") == "notification-event"
                  for q in _dicts(p.get("part")) if q.get("name") == "timestamp"]
        beat = any(p.get("name") == "type" and _value(p) == "heartbeat" for p in params)
    return [t for t in map(_instant, stamps) if t is not None], beat


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _value(param: dict[str, Any]) -> Any:
    return next((v for k, v in param.items() if k.startswith("value")), None)


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return ""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        return str(value).strip()
    return ""


def read_notification(payload: dict[str, Any]) -> Notification:
    """The patients and event key of a notification. Total over any JSON object: malformed
    parts (tests/reliability fuzzes them) are ignored."""
    found = Notification()
    if payload.get("resourceType") != "Bundle":
        found.add_resource(payload)
        return found
    entries = _dicts(payload.get("entry"))
    resources: dict[str, dict[str, Any]] = {}
    for e in entries:
        r = _obj(e.get("resource"))
        if r.get("resourceType") and isinstance(r.get("id"), str):
            resources[f"{r['resourceType']}/{r['id']}"] = r
        if (t := _target(_str(e.get("fullUrl")))) is not None and r:
            resources[f"{t[0]}/{t[1]}"] = r
    keys: list[str] = []
    statuses = 0
    for e in entries:
        r = _obj(e.get("resource"))
        if r.get("resourceType") in ("SubscriptionStatus", "Parameters"):
            statuses += 1
            sub, numbers, refs = _status(r)
            if sub and numbers and all(numbers):
                keys.append(f"{sub}#{','.join(numbers)}")
                found.numbered.setdefault(sub, []).extend(int(n) for n in numbers)
            stamps, beat = _event_times(r)
            found.times += stamps
            found.heartbeat = found.heartbeat or beat
            for ref in refs:
                found.add_ref(ref, resources)
        elif r:
            found.add_resource(r)
        elif (url := _str(e.get("fullUrl"))) and (_target(url) or ("", ""))[0] == "Patient":
            found.add_ref(url, resources)  # id-only: the entry is just its fullUrl
    # every status must name its subscription and event numbers, else the body is the key
    found.event = "|".join(keys) if statuses and len(keys) == statuses else ""
    return found


def patients_in(payload: dict[str, Any]) -> tuple[set[str], str]:
    """Patient ids a notification is about, and the event id used to de-duplicate it."""
    found = read_notification(payload)
    return found.patients, found.event


def event_key(payload: dict[str, Any], event: str) -> str:
    """The de-duplication key: the subscription's event numbers, or else a digest of the body
    in canonical JSON, so re-spacing or reordering it (one byte more) is still a duplicate."""
    if event:
        return "event:" + hashlib.sha256(b"sub:" + event.encode()).hexdigest()
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "event:" + hashlib.sha256(b"body:" + canonical.encode()).hexdigest()


def resume_point(found: Notification, now: datetime | None = None) -> str:
    """The instant a poll resumes from after this notification: its earliest event time (or
    resource lastUpdated), else its arrival less RECEIVED_MARGIN_S."""
    if found.times:
        return min(found.times)
    moment = (now or datetime.now(UTC)) - timedelta(seconds=RECEIVED_MARGIN_S)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

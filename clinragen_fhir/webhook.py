"""FHIR Subscription rest-hook receiver (ASGI): authenticate, de-duplicate, enqueue `diagnose`.

Accepts R4 rest-hook notifications (the changed resource, or an empty ping) and R4B/R5
topic-based notification Bundles (the R4 Subscriptions backport: a `Parameters` or
`SubscriptionStatus` first entry, full-resource or id-only). Authentication is an HMAC-SHA256
signature over timestamp + "." + body (preferred: it proves the body and bounds replays to a
time window) or a shared header secret (what HAPI can send, from Subscription.channel.header);
both compared in constant time. Duplicates and replays are dropped through Redis keys with a
time-to-live; a burst of notifications for one patient enqueues one task.

No notification is lost to a broker outage: keys are only *claimed* (a short-lived "pending"
value) before the task is queued, *kept* once it is queued, and released when queueing fails,
and the receiver then answers 503 so the FHIR server retries (issue 13, item 1).

HAPI FHIR delivers a rest-hook with a payload as a FHIR update, `PUT {endpoint}/{type}/{id}`
with the resource as body (and a delete as `DELETE {endpoint}/{type}/{id}`); those routes answer
with an OperationOutcome, which is what HAPI's client expects back from an update.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from clinragen_fhir import metrics
from clinragen_fhir.logs import hash_id
from clinragen_fhir.worker.state import CLAIM_TTL_S, Claim, RedisSeen

if TYPE_CHECKING:
    from clinragen_fhir.config import WebhookSettings

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
SIGNATURE_HEADER = "x-clinragen-signature"  # "sha256=<hex of HMAC(secret, ts + '.' + body)>"
TIMESTAMP_HEADER = "x-clinragen-timestamp"  # unix seconds (digits only), within MAX_SKEW_S
SECRET_HEADER = "x-clinragen-secret"
MAX_SKEW_S = 300
MAX_PATIENTS = 100  # per notification: a FHIR server's notification names one or a few
RETRY_AFTER_S = 5
# A notification with no event time counts as this long before it arrived (HAPI retries a
# delivery for about a minute): what a poll resumes from must not be later than the change.
RECEIVED_MARGIN_S = 120
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


class SeenStore(Protocol):
    """Remembers keys for a while; `add` is True only the first time (atomic)."""

    def add(self, key: str, ttl_s: int) -> bool: ...


@runtime_checkable
class EventLog(Protocol):
    """Remembers each subscription's last event (number, instant), so a gap in the numbers (a
    delivery the server gave up on while we were down) is noticed, and a poll resumes there."""

    def record_event(self, subscription: str, number: int, at: str) -> tuple[int, str] | None: ...

    def mark_seen(self, at: str) -> None: ...


@runtime_checkable
class ClaimStore(Protocol):
    """A store whose keys are claimed before the work they guard, then kept or given back, so
    a failure between the two leaves no key that would drop the sender's retry."""

    def claim(self, key: str, ttl_s: int) -> Claim: ...

    def keep(self, key: str, ttl_s: int) -> None: ...

    def release(self, key: str) -> None: ...


class _AddOnly:
    """A plain SeenStore as a ClaimStore: the claim is final (nothing to keep or give back)."""

    def __init__(self, seen: SeenStore) -> None:
        self.seen = seen

    def claim(self, key: str, ttl_s: int) -> Claim:
        return "new" if self.seen.add(key, ttl_s) else "done"

    def keep(self, key: str, ttl_s: int) -> None:
        return None

    def release(self, key: str) -> None:
        return None


@dataclass
class WebhookConfig:
    secret: bytes  # shared secret: header value, or HMAC key
    dedupe_ttl_s: int = 24 * 3600  # a body seen within this is a duplicate or a replay
    debounce_s: int = 30  # one task per patient per this many seconds
    max_body_bytes: int = MAX_BODY_BYTES
    max_patients: int = MAX_PATIENTS  # a notification naming more is refused (413)
    require_hmac: bool = False  # refuse the header secret (whoever saw it can send anything)
    claim_ttl_s: int = CLAIM_TTL_S

    def __post_init__(self) -> None:
        """A signed request stays valid MAX_SKEW_S either side of now: its replay key must
        outlive that window, or a replay after the key expired would be accepted."""
        if self.dedupe_ttl_s < 2 * MAX_SKEW_S:
            raise ValueError(f"dedupe_ttl_s must be >= {2 * MAX_SKEW_S} (the signature window)")
        if self.max_patients < 1:
            raise ValueError("max_patients must be >= 1")

    @classmethod
    def from_settings(cls, settings: WebhookSettings) -> WebhookConfig:
        """The receiver's configuration from the `[webhook]` settings (config.WebhookSettings:
        TOML, CLINRAGEN_WEBHOOK__*), the secret read now: FhirConfigError when it is unset,
        short or a placeholder, so the receiver does not start."""
        return cls(secret=settings.secret().get_secret_value().encode(),
                   dedupe_ttl_s=settings.dedupe_ttl_s, debounce_s=settings.debounce_s,
                   max_body_bytes=settings.max_body_bytes, max_patients=settings.max_patients,
                   require_hmac=settings.require_hmac)


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature a sender puts in X-Clinragen-Signature: it covers the timestamp and every
    byte of the body, so neither can be changed (or a byte appended) without the secret."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body,
                                hashlib.sha256).hexdigest()


def authenticate(headers: dict[str, str], body: bytes, secret: bytes,
                 now: float | None = None, require_hmac: bool = False) -> str | None:
    """None if authentic, else the reason (never echoing what was sent)."""
    given = headers.get(SECRET_HEADER)
    if given is not None and not require_hmac:
        return None if hmac.compare_digest(given.encode(), secret) else "wrong secret"
    signature, timestamp = headers.get(SIGNATURE_HEADER), headers.get(TIMESTAMP_HEADER)
    if signature is None or timestamp is None:
        return "header secret refused (HMAC required)" if given is not None else \
            "no credentials"
    if not _TIMESTAMP.fullmatch(timestamp):  # "nan" would pass any window comparison
        return "bad timestamp"
    if abs((now or time.time()) - int(timestamp)) > MAX_SKEW_S:
        return "timestamp outside the allowed window"
    if not hmac.compare_digest(signature.encode(), sign(secret, timestamp, body).encode()):
        return "bad signature"
    return None


# authenticate()'s reasons as metric labels (clinragen_webhook_auth_failures_total{reason})
AUTH_REASONS = {"wrong secret": "wrong-secret", "no credentials": "no-credentials",
                "header secret refused (HMAC required)": "header-secret-refused",
                "bad timestamp": "bad-timestamp",
                "timestamp outside the allowed window": "stale-timestamp",
                "bad signature": "bad-signature"}
# the answers' reasons as outcomes (clinragen_webhook_requests_total{outcome})
_OUTCOMES = {"duplicate": "duplicate", "empty notification": "empty",
             "names no patient": "no-patient", "invalid patient id": "no-patient",
             "delete": "delete"}
_STATUS_OUTCOMES = {400: "invalid", 401: "unauthorised", 413: "too-large", 503: "unavailable"}


def outcome_of(answer: JSONResponse) -> str:
    """What became of a request, as a metric label: accepted (a task queued), debounced,
    duplicate, empty, no-patient, delete, invalid, unauthorised, too-large, unavailable."""
    if answer.status_code in _STATUS_OUTCOMES:
        return _STATUS_OUTCOMES[answer.status_code]
    data = json.loads(bytes(answer.body))
    if answer.status_code == 202:
        return "accepted" if data.get("accepted") else "debounced"
    return _OUTCOMES.get(str(data.get("reason", "")), "other")


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


def make_app(config: WebhookConfig, seen: SeenStore | ClaimStore,
             enqueue: Callable[[str, int], None],
             recover: Callable[[str, int], None] | None = None) -> Starlette:
    """The ASGI app. `enqueue(patient_id, countdown_s)` puts a diagnose task on the queue.

    `recover(since, missed)` is called when a subscription's event numbers skip (`missed`
    events were never delivered, e.g. while this receiver was down): it queues a poll of the
    changes since the last event seen (`poll_changes(since=...)`). The store, when it is an
    EventLog (RedisSeen), keeps each subscription's last event and the newest one's time."""
    store: ClaimStore = seen if isinstance(seen, ClaimStore) else _AddOnly(seen)
    events: EventLog | None = seen if isinstance(seen, EventLog) else None

    def track(found: Notification) -> JSONResponse | None:
        """Record the events; on a gap, queue the recovery poll. None, or the 503 to answer
        when the recovery could not be queued (the sender retries, and the gap is seen again)."""
        if events is None:
            return None
        at = resume_point(found)
        try:
            for sub, numbers in sorted(found.numbered.items()):
                prev = events.record_event(sub, max(numbers), at)
                if prev is None:
                    continue
                # an event's number follows the last one; a heartbeat repeats the count
                expected = prev[0] if found.heartbeat else prev[0] + 1
                missed = min(numbers) - expected
                if missed > 0 and min(numbers) > 1:  # 1: the server restarted its count
                    log.warning("webhook missed subscription events", extra={"fields": {
                        "missed": missed, "since": prev[1]}})
                    try:
                        if recover is not None:
                            recover(prev[1], missed)
                    except Exception as exc:
                        metrics.WEBHOOK_ENQUEUE_FAILURES.labels("poll").inc()
                        events.record_event(sub, 1, prev[1])  # back: the retry sees the gap
                        events.record_event(sub, prev[0], prev[1])
                        log.error("webhook could not queue the recovery poll", extra={
                            "fields": {"error": type(exc).__name__}})
                        return unavailable("recovery poll not queued: retry")
            events.mark_seen(at)
        except Exception as exc:  # the store is down: the periodic poll still covers it
            log.warning("webhook could not record the event", extra={"fields": {
                "error": type(exc).__name__}})
        return None

    # a plain SeenStore's first add is final: it must carry the whole de-duplication window
    event_claim_ttl = config.claim_ttl_s if isinstance(seen, ClaimStore) else config.dedupe_ttl_s

    def unavailable(error: str) -> JSONResponse:
        return JSONResponse({"error": error}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    def release(keys: list[str]) -> None:
        for key in keys:
            try:
                store.release(key)
            except Exception:  # the store is down too: the claims expire by themselves
                log.warning("webhook could not release a claim", extra={"fields": {
                    "expires_in_s": config.claim_ttl_s}})

    def accept(patients: set[str], key: str) -> JSONResponse:
        """Claim, queue, then keep: a key is final only once its task is on the queue."""
        claimed: list[str] = []
        try:
            state = store.claim(key, event_claim_ttl)
            if state == "done":
                return JSONResponse({"accepted": 0, "reason": "duplicate"})
            if state == "pending":
                return unavailable("the same notification is being queued: retry")
            claimed.append(key)
            todo = []
            for pid in sorted(patients):
                if store.claim(f"patient:{pid}", config.debounce_s) == "new":
                    todo.append(pid)
                    claimed.append(f"patient:{pid}")
        except Exception as exc:  # never the exception's text: it can hold the store's URL
            log.error("webhook state store failed", extra={"fields": {
                "error": type(exc).__name__}})
            release(claimed)
            return unavailable("state store unavailable: retry")
        queued = 0
        for pid in todo:
            try:
                enqueue(pid, config.debounce_s)
            except Exception as exc:
                metrics.WEBHOOK_ENQUEUE_FAILURES.labels("diagnose").inc()
                log.error("webhook could not queue", extra={"fields": {
                    "error": type(exc).__name__, "queued": queued,
                    "not_queued": len(todo) - queued}})
                release([key] + [f"patient:{p}" for p in todo[queued:]])
                return unavailable("queue unavailable: retry")
            queued += 1
        try:
            store.keep(key, config.dedupe_ttl_s)
        except Exception as exc:  # queued already: the pending claim expires by itself
            log.warning("webhook could not keep the event key", extra={"fields": {
                "error": type(exc).__name__}})
        log.info("webhook accepted", extra={"fields": {
            "patients": [hash_id(p) for p in patients], "queued": queued}})
        answer: dict[str, Any] = {"accepted": queued, "patients": len(patients)}
        if not queued:
            answer["reason"] = "debounced: a task for each patient is queued already"
        return JSONResponse(answer, status_code=202)

    def refused(request: Request, body: bytes) -> str | None:
        """authenticate(), the refusal counted by reason."""
        reason = authenticate({k.lower(): v for k, v in request.headers.items()}, body,
                              config.secret, require_hmac=config.require_hmac)
        if reason is not None:
            metrics.WEBHOOK_AUTH_FAILURES.labels(AUTH_REASONS.get(reason, "other")).inc()
        return reason

    def counted(answer: JSONResponse) -> JSONResponse:
        metrics.WEBHOOK_REQUESTS.labels(outcome_of(answer)).inc()
        return answer

    async def notify(request: Request) -> JSONResponse:
        return counted(await receive(request))

    async def receive(request: Request) -> JSONResponse:
        length = int(request.headers.get("content-length") or 0)
        if length > config.max_body_bytes:
            return JSONResponse({"error": "payload too large"}, status_code=413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                return JSONResponse({"error": "payload too large"}, status_code=413)
        reason = refused(request, body)
        if reason is not None:
            log.warning("webhook rejected", extra={"fields": {"reason": reason}})
            return JSONResponse({"error": "unauthorised"}, status_code=401)
        if not body.strip():  # R4 rest-hook without payload, or a handshake: nothing to do
            return JSONResponse({"accepted": 0, "reason": "empty notification"})
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict):
                raise ValueError("not an object")
        except ValueError:
            return JSONResponse({"error": "body is not a FHIR JSON resource"}, status_code=400)
        found = read_notification(payload)
        if found.refused:
            log.warning("webhook refused patient ids", extra={"fields": {
                "refused": found.refused}})
        if len(found.patients) > config.max_patients:
            log.warning("webhook refused a notification", extra={"fields": {
                "patients": len(found.patients), "max_patients": config.max_patients}})
            return JSONResponse({"error": f"more than {config.max_patients} patients in one "
                                 "notification"}, status_code=413)
        if not found.patients:
            if (failed := track(found)) is not None:  # a heartbeat can reveal a gap too
                return failed
            reason = "invalid patient id" if found.refused else "names no patient"
            return JSONResponse({"accepted": 0, "reason": reason, "refused": found.refused})
        answer = accept(found.patients, event_key(payload, found.event))
        if answer.status_code < 300 and (failed := track(found)) is not None:
            return failed
        return answer

    async def notify_resource(request: Request) -> JSONResponse:
        """HAPI's delivery: `PUT /notify/Type/id` (create/update) or `DELETE` (ignored)."""
        if request.method == "DELETE":
            answer = JSONResponse({"accepted": 0, "reason": "delete"}) \
                if refused(request, b"") is None else \
                JSONResponse({"error": "unauthorised"}, status_code=401)
        else:
            answer = await receive(request)
        counted(answer)
        data = json.loads(bytes(answer.body))
        severity = "information" if answer.status_code < 400 else "error"
        text = ", ".join(f"{k}: {v}" for k, v in data.items())
        code = "informational" if severity == "information" else "security" \
            if answer.status_code == 401 else "transient" if answer.status_code == 503 \
            else "invalid"
        retry = {k: v for k, v in answer.headers.items() if k.lower() == "retry-after"}
        return JSONResponse({"resourceType": "OperationOutcome", "issue": [{
            "severity": severity, "code": code, "diagnostics": text}]},
            status_code=200 if answer.status_code == 202 else answer.status_code,
            media_type="application/fhir+json", headers=retry)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/notify", notify, methods=["POST"]),
                             Route("/notify/{rtype}/{rid}", notify_resource,
                                   methods=["PUT", "POST", "DELETE"]),
                             Route("/health", health, methods=["GET"])])


def create_app() -> ASGIApp:
    """Entry point for uvicorn (`uvicorn --factory clinragen_fhir.webhook:create_app`). With
    `[tracing] enabled`, the app is wrapped in the ASGI instrumentation and each publish is a
    child span whose `traceparent` travels in the task message (clinragen_fhir/tracing.py)."""
    from clinragen_fhir import tracing
    from clinragen_fhir.config import Settings
    from clinragen_fhir.worker.app import task_reprs
    from clinragen_fhir.worker.tasks import diagnose, poll_changes

    settings = Settings()
    settings.check_site_secrets()

    def enqueue(patient_id: str, countdown: int) -> None:
        """Publish, or raise quickly: nobody reads a webhook task's result, and subscribing to
        it made a publish wait ~19 s (the result backend's retries) while Redis was down."""
        diagnose.apply_async((patient_id,), countdown=countdown, ignore_result=True,
                             **task_reprs((patient_id,)))

    def recover(since: str, missed: int) -> None:
        """A poll of every change since the last event seen (`poll_changes(since=...)`)."""
        poll_changes.apply_async(kwargs={"since": since}, ignore_result=True,
                                 **task_reprs((), {"since": since}))

    app = make_app(WebhookConfig.from_settings(settings.webhook),
                   RedisSeen(settings.state_url), enqueue, recover)
    return tracing.asgi(app, tracing.setup(settings.tracing, "webhook"))

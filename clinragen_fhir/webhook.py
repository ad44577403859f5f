"""FHIR Subscription rest-hook receiver (ASGI): authenticate, de-duplicate, enqueue `diagnose`.

Accepts R4 rest-hook notifications (the changed resource, or an empty ping) and R4B/R5
topic-based notification Bundles (the R4 Subscriptions backport: a `Parameters` or
`SubscriptionStatus` first entry, full-resource or id-only). Authentication is an HMAC-SHA256
signature over timestamp + "." + body (preferred: it proves the body and bounds replays to a
time window) or a shared header secret (what HAPI can send, from Subscription.channel.header);
both compared in constant time. What a notification names (patients, event key, event times)
is read by fhir/notifications.py. Duplicates and replays are dropped through Redis keys with a
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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from clinragen_fhir import metrics
from clinragen_fhir.fhir.notifications import (
    Notification,
    event_key,
    read_notification,
    resume_point,
)
from clinragen_fhir.logs import hash_id
from clinragen_fhir.worker.state import (
    CLAIM_TTL_S,
    AddOnly,
    ClaimStore,
    EventLog,
    RedisSeen,
    SeenStore,
)

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
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


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


def make_app(config: WebhookConfig, seen: SeenStore | ClaimStore,
             enqueue: Callable[[str, int], None],
             recover: Callable[[str, int], None] | None = None) -> Starlette:
    """The ASGI app. `enqueue(patient_id, countdown_s)` puts a diagnose task on the queue.

    `recover(since, missed)` is called when a subscription's event numbers skip (`missed`
    events were never delivered, e.g. while this receiver was down): it queues a poll of the
    changes since the last event seen (`poll_changes(since=...)`). The store, when it is an
    EventLog (RedisSeen), keeps each subscription's last event and the newest one's time."""
    store: ClaimStore = seen if isinstance(seen, ClaimStore) else AddOnly(seen)
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

"""FHIR Subscription rest-hook receiver (ASGI): authenticate, de-duplicate, enqueue `diagnose`.

Accepts R4 rest-hook notifications (the changed resource, or an empty ping) and R4B/R5
topic-based notification Bundles (the R4 Subscriptions backport). Authentication is a shared
header secret (HAPI sends Subscription.channel.header) or an HMAC-SHA256 signature over
timestamp + body; both compared in constant time. Replays and duplicates are dropped through a
Redis SET NX with a time-to-live; a burst of notifications for one patient enqueues one task.

HAPI FHIR delivers a rest-hook with a payload as a FHIR update, `PUT {endpoint}/{type}/{id}`
with the resource as body (and a delete as `DELETE {endpoint}/{type}/{id}`); those routes answer
with an OperationOutcome, which is what HAPI's client expects back from an update.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from clinragen_fhir.logs import hash_id
from clinragen_fhir.site_secrets import is_placeholder

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
SIGNATURE_HEADER = "x-clinragen-signature"  # "sha256=<hex of HMAC(secret, ts + '.' + body)>"
TIMESTAMP_HEADER = "x-clinragen-timestamp"  # unix seconds, within MAX_SKEW_S of ours
SECRET_HEADER = "x-clinragen-secret"
MAX_SKEW_S = 300


class SeenStore(Protocol):
    """Remembers keys for a while; `add` is True only the first time (atomic)."""

    def add(self, key: str, ttl_s: int) -> bool: ...


@dataclass
class WebhookConfig:
    secret: bytes  # shared secret: header value, or HMAC key
    dedupe_ttl_s: int = 24 * 3600  # a body seen within this is a duplicate or a replay
    debounce_s: int = 30  # one task per patient per this many seconds
    max_body_bytes: int = MAX_BODY_BYTES

    @classmethod
    def from_env(cls) -> WebhookConfig:
        secret = os.environ.get("CLINRAGEN_WEBHOOK_SECRET", "").strip()  # as `subscribe` sends it
        debounce = int(os.environ.get("CLINRAGEN_WEBHOOK_DEBOUNCE_S", "30"))
        path = os.environ.get("CLINRAGEN_WEBHOOK_SECRET_FILE")
        if not secret and path:
            with open(path) as fh:
                secret = fh.read().strip()
        if len(secret) < 16:
            raise ValueError("set CLINRAGEN_WEBHOOK_SECRET(_FILE) to a secret of >= 16 chars")
        if is_placeholder(secret):
            raise ValueError("CLINRAGEN_WEBHOOK_SECRET(_FILE) is the example configs' "
                             "placeholder: set a real secret")
        return cls(secret=secret.encode(), debounce_s=debounce)


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature a sender puts in X-Clinragen-Signature."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body,
                                hashlib.sha256).hexdigest()


def authenticate(headers: dict[str, str], body: bytes, secret: bytes,
                 now: float | None = None) -> str | None:
    """None if authentic, else the reason (never echoing what was sent)."""
    given = headers.get(SECRET_HEADER)
    if given is not None:
        return None if hmac.compare_digest(given.encode(), secret) else "wrong secret"
    signature, timestamp = headers.get(SIGNATURE_HEADER), headers.get(TIMESTAMP_HEADER)
    if signature is None or timestamp is None:
        return "no credentials"
    try:
        skew = abs((now or time.time()) - float(timestamp))
    except ValueError:
        return "bad timestamp"
    if skew > MAX_SKEW_S:
        return "timestamp outside the allowed window"
    if not hmac.compare_digest(signature.encode(), sign(secret, timestamp, body).encode()):
        return "bad signature"
    return None


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The objects in a JSON list (anything else in a notification is ignored, not a crash)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _patient_of(resource: dict[str, Any]) -> str | None:
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) and rid else None
    for key in ("subject", "patient"):
        ref = _obj(resource.get(key)).get("reference", "")
        if isinstance(ref, str) and ref.startswith("Patient/"):
            return ref.split("/")[1] or None
    return None


def patients_in(payload: dict[str, Any]) -> tuple[set[str], str]:
    """Patient ids a notification is about, and the event id used to de-duplicate it.

    Total over any JSON object: malformed parts (tests/reliability fuzzes them) are ignored."""
    if payload.get("resourceType") != "Bundle":
        return ({p} if (p := _patient_of(payload)) else set()), ""
    entries = [_obj(e.get("resource")) for e in _dicts(payload.get("entry"))]
    event = ""
    patients: set[str] = set()
    for r in entries:
        if r.get("resourceType") in ("SubscriptionStatus", "Parameters"):
            # R5 SubscriptionStatus / R4 backport Parameters: events counted per subscription
            events = _dicts(r.get("notificationEvent"))
            params = {str(p.get("name")): p for p in _dicts(r.get("parameter"))}
            sub = _obj(r.get("subscription")
                       or _obj(params.get("subscription")).get("valueReference")).get(
                "reference", "")
            numbers = [str(e.get("eventNumber")) for e in events] or \
                [str(_obj(params.get("events-since-subscription-start")).get("valueString",
                                                                             ""))]
            event = f"{sub}#{','.join(numbers)}"
            for ev in events:
                focus = _obj(ev.get("focus")).get("reference", "")
                if isinstance(focus, str) and focus.startswith("Patient/") and \
                        focus.split("/")[1]:
                    patients.add(focus.split("/")[1])
        elif (p := _patient_of(r)) is not None:
            patients.add(p)
    return patients, event


def make_app(config: WebhookConfig, seen: SeenStore,
             enqueue: Callable[[str, int], None]) -> Starlette:
    """The ASGI app. `enqueue(patient_id, countdown_s)` puts a diagnose task on the queue."""

    async def notify(request: Request) -> JSONResponse:
        length = int(request.headers.get("content-length") or 0)
        if length > config.max_body_bytes:
            return JSONResponse({"error": "payload too large"}, status_code=413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                return JSONResponse({"error": "payload too large"}, status_code=413)
        reason = authenticate({k.lower(): v for k, v in request.headers.items()}, body,
                              config.secret)
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
        patients, event = patients_in(payload)
        digest = hashlib.sha256(event.encode() if event else body).hexdigest()
        if not seen.add(f"event:{digest}", config.dedupe_ttl_s):
            return JSONResponse({"accepted": 0, "reason": "duplicate"})
        queued = 0
        for pid in sorted(patients):
            if seen.add(f"patient:{pid}", config.debounce_s):
                enqueue(pid, config.debounce_s)
                queued += 1
        log.info("webhook accepted", extra={"fields": {
            "patients": [hash_id(p) for p in patients], "queued": queued}})
        return JSONResponse({"accepted": queued, "patients": len(patients)}, status_code=202)

    async def notify_resource(request: Request) -> JSONResponse:
        """HAPI's delivery: `PUT /notify/Type/id` (create/update) or `DELETE` (ignored)."""
        if request.method == "DELETE":
            reason = authenticate({k.lower(): v for k, v in request.headers.items()}, b"",
                                  config.secret)
            answer = JSONResponse({"accepted": 0, "reason": "delete"}) if reason is None else \
                JSONResponse({"error": "unauthorised"}, status_code=401)
        else:
            answer = await notify(request)
        data = json.loads(bytes(answer.body))
        severity = "information" if answer.status_code < 400 else "error"
        text = ", ".join(f"{k}: {v}" for k, v in data.items())
        return JSONResponse({"resourceType": "OperationOutcome", "issue": [{
            "severity": severity, "code": "informational" if severity == "information"
            else "security" if answer.status_code == 401 else "invalid",
            "diagnostics": text}]}, status_code=200 if answer.status_code == 202
            else answer.status_code, media_type="application/fhir+json")

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/notify", notify, methods=["POST"]),
                             Route("/notify/{rtype}/{rid}", notify_resource,
                                   methods=["PUT", "POST", "DELETE"]),
                             Route("/health", health, methods=["GET"])])


def create_app() -> Starlette:
    """Entry point for uvicorn (`uvicorn --factory clinragen_fhir.webhook:create_app`)."""
    from clinragen_fhir.config import Settings
    from clinragen_fhir.worker.state import WorkerState
    from clinragen_fhir.worker.tasks import diagnose

    settings = Settings()
    settings.check_site_secrets()

    def enqueue(patient_id: str, countdown: int) -> None:
        diagnose.apply_async((patient_id,), countdown=countdown)

    return make_app(WebhookConfig.from_env(), WorkerState(settings.state_url), enqueue)

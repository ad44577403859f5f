"""CDS Hooks 2.0 `patient-view` service (ASGI): the latest stored report, as one card.

A clinician inside the EHR never opens the FHIR server, so the report has to come to them: when
a chart opens, the EHR calls `POST /cds-services/<id>` and gets a card naming the report's top
concluded disorders, how many of its lab claims hold against the record, and a link to the HTML
page the report carries. The service only *reads* what the worker wrote; it never runs a model,
so it answers in one FHIR search.

Auth is the CDS Hooks JWT: a bearer token the EHR signs with its own key (RS384/ES384), checked
against a configured issuer and key set, audience (this service's URL), expiry (at most five
minutes ahead) and a `jti` not seen before. The EHR's `fhirServer`/`fhirAuthorization` are
ignored: reports are read from the configured server with the project's own credentials, so a
request cannot point the service at another host. Without JWT settings the service starts only
on loopback, and only when told so (`[cds_hooks] auth = "none"`): it never fails open. The
settings are `[cds_hooks]` (config.CdsHooksSettings, CLINRAGEN_CDS_HOOKS__* by environment).

Feedback (`POST /cds-services/<id>/feedback`) records each accept or override as an AuditEvent
and a Prometheus count. Cards are remembered by uuid (Redis in production) so the AuditEvent can
name the patient and report a card was about; feedback lists no patient itself.

This module is the service (routes, the audit of feedback, the report page); its parts are in
clinragen_fhir/cds/: `auth` (the JWT), `card` (the card from a report), `requests` (what the
EHR sends, read strictly), `store` (replay keys and shown cards), `config` (its settings).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from clinragen_fhir.cds.auth import check_token
from clinragen_fhir.cds.card import build_card, disorders, latest_report
from clinragen_fhir.cds.config import CdsConfig
from clinragen_fhir.cds.requests import (
    HOOK,
    BadRequest,
    Feedback,
    read_feedback,
    read_hook_request,
    valid_id,
)
from clinragen_fhir.cds.store import RedisStore, Store
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirError, FhirHTTPError
from clinragen_fhir.logs import hash_id
from clinragen_fhir.report.audit import attempt_event_id, audit_bundle, audit_event
from clinragen_fhir.report.html import decode_presented_form

log = logging.getLogger(__name__)

SERVICE_ID = "clinragen-diagnoses"
_VERSION = re.compile(r"[A-Za-z0-9\-.]{1,64}")
FEEDBACK_SYSTEM = "https://clinragen-fhir.org/CodeSystem/cds-feedback"


def sign_link(secret: bytes, report_id: str, version: str, expires: int) -> str:
    return hmac.new(secret, f"{report_id}|{version}|{expires}".encode(),
                    hashlib.sha256).hexdigest()


# -- the app --------------------------------------------------------------------------------
def discovery() -> dict[str, Any]:
    """The discovery document: one patient-view service."""
    return {"services": [{
        "hook": HOOK,
        "id": SERVICE_ID,
        "title": "ClinRaGen diagnoses with rationale",
        "description": ("The latest machine-generated ClinRaGen report for the patient: top "
                        "suspected disorders, how many of its lab claims hold against the "
                        "record, and a link to the full report. Preliminary decision support."),
        "prefetch": {"patient": "Patient/{{context.patientId}}"},
        "usageRequirements": "Reports must have been written by the ClinRaGen-FHIR worker.",
    }]}


def make_app(config: CdsConfig, client_factory: Callable[[], FhirClient], report_system: str,
             store: Store, record_feedback: Callable[[Feedback], None] | None = None) -> Starlette:
    """The ASGI app. `client_factory()` gives a FHIR client (closed after each request);
    `record_feedback` is told of each feedback item (the Prometheus count)."""

    def error(status: int, text: str) -> JSONResponse:
        return JSONResponse({"error": text}, status_code=status)

    def authorise(request: Request, service: str) -> JSONResponse | None:
        if config.auth is None:
            return None
        endpoint = f"{config.base_url}/cds-services/{service}"
        audiences = [endpoint, f"{endpoint}/feedback", f"{config.base_url}/cds-services"]
        try:
            reason = check_token(request.headers.get("authorization"), config.auth, audiences,
                                 store)
        except Exception as exc:  # the replay store is down: refuse, never accept unchecked
            log.error("cds replay store failed", extra={"fields": {"error": type(exc).__name__}})
            return JSONResponse({"error": "unavailable: retry"}, status_code=503,
                                headers={"Retry-After": "5"})
        if reason is not None:
            log.warning("cds request rejected", extra={"fields": {"reason": reason}})
            return JSONResponse({"error": "unauthorised"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return None

    async def read_json(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("application/json", "application/fhir+json"):
            raise BadRequest("send application/json")
        if int(request.headers.get("content-length") or 0) > config.max_body_bytes:
            raise BadRequest("body too large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise BadRequest("body too large")
        try:
            data = json.loads(body)
        except ValueError:
            raise BadRequest("body is not JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("body must be a JSON object")
        return data

    def link_for(request: Request, report: Mapping[str, Any]) -> str:
        rid = str(report.get("id", ""))
        version = str((report.get("meta") or {}).get("versionId") or "")
        if config.report_url:
            return config.report_url.format(id=quote(rid, safe=""),
                                            version=quote(version, safe=""))
        expires = int(time.time()) + config.link_ttl_s
        base = config.base_url or str(request.base_url).rstrip("/")
        sig = sign_link(config.link_secret, rid, version, expires)
        return (f"{base}/reports/{rid}" + (f"/_history/{version}" if version else "") +
                f"?exp={expires}&sig={sig}")

    def refusal(request: Request) -> JSONResponse | None:
        """404 for a service we do not offer, else what `authorise` refuses; None: go on."""
        service = request.path_params["service"]
        if service != SERVICE_ID:
            return error(404, "no such CDS service")
        return authorise(request, service)

    async def services(request: Request) -> JSONResponse:
        return JSONResponse(discovery())

    async def hook(request: Request) -> JSONResponse:
        if (refused := refusal(request)) is not None:
            return refused
        try:
            instance, pid, user = read_hook_request(await read_json(request))
        except BadRequest as exc:
            return error(400, str(exc))
        phash = hash_id(pid)
        try:
            with client_factory() as client:
                report = latest_report(client, pid, report_system)
        except FhirError as exc:
            log.error("cds report lookup failed", extra={"fields": {
                "patient": phash, "error": type(exc).__name__}})
            return JSONResponse({"error": "the FHIR server did not answer: retry"},
                                status_code=503, headers={"Retry-After": "5"})
        if report is None or not disorders(report):
            log.info("cds no card", extra={"fields": {
                "patient": phash, "reason": "no report" if report is None else "no disorder"}})
            return JSONResponse({"cards": []})
        card_id = str(uuid.uuid4())
        version = str((report.get("meta") or {}).get("versionId") or "")
        ident = next((i for i in report.get("identifier") or []
                      if isinstance(i, dict) and i.get("system") == report_system), {})
        shown = {"patient": pid, "report": str(report.get("id", "")), "version": version,
                 "identifier": str(ident.get("value", "")), "user": user,
                 "hookInstance": instance}
        try:
            store.put(f"card:{card_id}", json.dumps(shown), config.card_ttl_s)
        except Exception as exc:  # the card is still worth showing; its feedback is lost
            log.warning("cds card not remembered", extra={"fields": {
                "error": type(exc).__name__}})
        log.info("cds card", extra={"fields": {"patient": phash, "report": shown["report"],
                                               "card": card_id}})
        return JSONResponse({"cards": [build_card(report, link_for(request, report), card_id)]})

    def audit(item: Feedback, shown: Mapping[str, str]) -> dict[str, Any]:
        """One AuditEvent: who decided what about which card (the report by identifier)."""
        details: dict[str, object] = {"cds card": item.card, "outcome": item.outcome,
                                      "outcomeTimestamp": item.timestamp,
                                      "hookInstance": shown.get("hookInstance", "")}
        if shown.get("report"):
            details["report"] = f"DiagnosticReport/{shown['report']}" + (
                f"/_history/{shown['version']}" if shown.get("version") else "")
        if item.reason:
            details["override reason"] = item.reason
        if item.accepted_suggestions:
            details["accepted suggestions"] = item.accepted_suggestions
        written = {"type": "DiagnosticReport", "identifier": {
            "system": report_system, "value": shown["identifier"]}} \
            if shown.get("identifier") else None
        event = audit_event("E", shown["patient"], interactions=[], details=details,
                            written=written)
        event["subtype"] = [{"system": FEEDBACK_SYSTEM, "code": item.outcome,
                             "display": f"CDS Hooks card {item.outcome}"}]
        if shown.get("user"):  # the clinician, as the EHR named them (a logical reference)
            event["agent"].append({"who": {"identifier": {"value": shown["user"]},
                                           "display": shown["user"]}, "requestor": False})
        return event

    async def feedback(request: Request) -> JSONResponse:
        if (refused := refusal(request)) is not None:
            return refused
        try:
            items = read_feedback(await read_json(request))
        except BadRequest as exc:
            return error(400, str(exc))
        try:
            found = [(i, store.get(f"card:{i.card}")) for i in items]
        except Exception as exc:
            log.error("cds card store failed", extra={"fields": {"error": type(exc).__name__}})
            return JSONResponse({"error": "unavailable: retry"}, status_code=503,
                                headers={"Retry-After": "5"})
        unknown = sum(1 for _, s in found if s is None)
        if unknown:
            return error(404, f"{unknown} feedback item(s) name a card this service did not "
                         "show (or one shown too long ago)")
        events, ids = [], []
        for item, raw in found:
            shown = json.loads(raw or "{}")
            events.append(audit(item, shown))
            ids.append(attempt_event_id("cds-feedback", item.card, item.outcome, item.timestamp))
        try:
            with client_factory() as client:
                client.transaction(audit_bundle(events, ids=ids))  # PUT by id: a retry is no dup
        except FhirError as exc:
            log.error("cds feedback not recorded", extra={"fields": {
                "error": type(exc).__name__, "status": getattr(exc, "status", None)
                if isinstance(exc, FhirHTTPError) else None}})
            return JSONResponse({"error": "feedback not recorded: retry"}, status_code=503,
                                headers={"Retry-After": "5"})
        for item in items:
            if record_feedback is not None:
                record_feedback(item)
        log.info("cds feedback", extra={"fields": {
            "cards": [i.card for i in items], "outcomes": [i.outcome for i in items]}})
        return JSONResponse({"recorded": len(items)})

    async def report_page(request: Request) -> Response:
        """The HTML page a card links to, behind a signed, expiring link (a browser has no
        JWT and no FHIR credentials); served with a CSP that allows no script or fetch."""
        rid, version = request.path_params["rid"], request.path_params.get("version", "")
        exp, sig = request.query_params.get("exp", ""), request.query_params.get("sig", "")
        if not valid_id(rid) or (version and not _VERSION.fullmatch(version)) or \
                not exp.isdigit() or len(exp) > 12:
            return error(400, "bad report link")
        if not hmac.compare_digest(sig.encode(), sign_link(config.link_secret, rid, version,
                                                           int(exp)).encode()):
            return error(403, "bad link signature")
        if int(exp) < time.time():
            return error(403, "link expired: open the card again")
        try:
            with client_factory() as client:
                report = client.read("DiagnosticReport",
                                     f"{rid}/_history/{version}" if version else rid)
        except FhirHTTPError as exc:
            if exc.status in (404, 410):
                return error(404, "report not found")
            return error(503, "the FHIR server did not answer: retry")
        except FhirError:
            return error(503, "the FHIR server did not answer: retry")
        if not any(isinstance(i, dict) and i.get("system") == report_system
                   for i in report.get("identifier") or []):
            return error(404, "report not found")
        page = decode_presented_form(report)
        if page is None:
            return error(404, "the report carries no HTML page")
        return HTMLResponse(page, headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                       "img-src data:; frame-ancestors 'self'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store, private",
            "Referrer-Policy": "no-referrer"})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    middleware = [Middleware(CORSMiddleware, allow_origins=config.cors_origins,
                             allow_methods=["GET", "POST"],
                             allow_headers=["authorization", "content-type"])] \
        if config.cors_origins else []
    return Starlette(routes=[
        Route("/cds-services", services, methods=["GET"]),
        Route("/cds-services/{service}", hook, methods=["POST"]),
        Route("/cds-services/{service}/feedback", feedback, methods=["POST"]),
        Route("/reports/{rid}", report_page, methods=["GET"]),
        Route("/reports/{rid}/_history/{version}", report_page, methods=["GET"]),
        Route("/health", health, methods=["GET"])], middleware=middleware)


def count_feedback(item: Feedback) -> None:
    """The Prometheus count of one feedback item (labels: outcome, offered reason code)."""
    from clinragen_fhir.metrics import CDS_FEEDBACK

    CDS_FEEDBACK.labels(item.outcome, item.reason or "none").inc()


def create_app(host: str = "") -> ASGIApp:
    """Entry point (`clinragen-fhir cds-hooks`; for uvicorn `--factory`, JWT auth is required
    since the bind address is not known here). With `[tracing] enabled`: ASGI server spans and
    the FHIR reads as their children (clinragen_fhir/tracing.py; `/reports/{id}` scrubbed)."""
    from clinragen_fhir import tracing
    from clinragen_fhir.config import Settings
    from clinragen_fhir.metrics import observe_fhir

    settings = Settings()
    settings.check_site_secrets()
    config = CdsConfig.from_settings(settings.cds_hooks)
    config.check_bind(host or "0.0.0.0")
    if config.auth is None:
        log.warning("cds hooks service without auth (loopback only)")
    app = make_app(config, lambda: settings.fhir.client(observer=observe_fhir),
                   settings.report.identifier_system, RedisStore(settings.state_url),
                   count_feedback)
    return tracing.asgi(app, tracing.setup(settings.tracing, "cds-hooks", celery=False))


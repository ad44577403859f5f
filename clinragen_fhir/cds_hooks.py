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
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import quote

import jwt
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from clinragen_fhir.config import CdsHooksSettings
from clinragen_fhir.fhir.client import FhirClient, is_loopback
from clinragen_fhir.fhir.errors import FhirError, FhirHTTPError
from clinragen_fhir.fhir.resources import SNOMED
from clinragen_fhir.logs import hash_id
from clinragen_fhir.report.audit import attempt_event_id, audit_bundle, audit_event
from clinragen_fhir.report.build import DISCLAIMER, EXT_BASE, SOFTWARE
from clinragen_fhir.report.html import decode_presented_form
from clinragen_fhir.report.problem_list import KNOWN, NOT_CHECKED, SUSPECTED, read_extension

log = logging.getLogger(__name__)

SERVICE_ID = "clinragen-diagnoses"
HOOK = "patient-view"
MAX_BODY_BYTES = 2 * 1024 * 1024  # a hook request with prefetched resources stays far below
MAX_DISORDERS = 3  # named in the summary; the rest are counted ("+2 more")
MAX_FEEDBACK = 50  # feedback items per request
JWT_ALGORITHMS = ["RS384", "ES384", "RS256", "ES256", "PS384"]  # asymmetric only: no HS/none
MAX_TOKEN_LIFE_S = 300  # CDS Hooks: exp no more than five minutes in the future
LEEWAY_S = 30
CARD_TTL_S = 7 * 24 * 3600  # feedback on a card is accepted this long after it was shown
LINK_TTL_S = 12 * 3600  # a signed report link works for one shift
SUMMARY_CHARS = 140  # CDS Hooks: summary SHOULD be under 140 characters
FEEDBACK_SYSTEM = "https://clinragen-fhir.org/CodeSystem/cds-feedback"
OVERRIDE_SYSTEM = "https://clinragen-fhir.org/CodeSystem/cds-override-reason"
OVERRIDE_REASONS = {"already-known": "Already known or being addressed",
                    "not-relevant": "Not relevant to this visit",
                    "disagree": "Disagree with the suggested diagnoses"}
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_USER = re.compile(r"(Practitioner|PractitionerRole|Patient|RelatedPerson)/[A-Za-z0-9\-.]{1,64}")
_VERSION = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_MD_SPECIAL = re.compile(r"([\\`*_\[\]()!|<>~])")  # what makes links, emphasis, HTML


def valid_id(value: Any) -> bool:
    """FHIR id syntax and no `.`/`..`: the id becomes part of a request to the FHIR server."""
    return isinstance(value, str) and _FHIR_ID.fullmatch(value) is not None and \
        value not in (".", "..") and ".." not in value


class BadRequest(ValueError):
    """A request the service refuses with 400 (the text says what to fix, never echoes data)."""


# -- stores ---------------------------------------------------------------------------------
class Store(Protocol):
    """Replay keys (`add`: True only the first time) and shown cards (`put`/`get`)."""

    def add(self, key: str, ttl_s: int) -> bool: ...

    def put(self, key: str, value: str, ttl_s: int) -> None: ...

    def get(self, key: str) -> str | None: ...


class MemoryStore:
    """A bounded in-process Store: one process only, forgotten on restart (tests, loopback)."""

    def __init__(self, max_items: int = 100_000) -> None:
        self._items: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_items = max_items

    def _live(self, key: str, now: float) -> str | None:
        item = self._items.get(key)
        if item is None or item[0] < now:
            self._items.pop(key, None)
            return None
        return item[1]

    def _set(self, key: str, value: str, ttl_s: int, now: float) -> None:
        self._items[key] = (now + max(1, ttl_s), value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def add(self, key: str, ttl_s: int) -> bool:
        with self._lock:
            now = time.monotonic()
            if self._live(key, now) is not None:
                return False
            self._set(key, "1", ttl_s, now)
            return True

    def put(self, key: str, value: str, ttl_s: int) -> None:
        with self._lock:
            self._set(key, value, ttl_s, time.monotonic())

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._live(key, time.monotonic())


class RedisStore:
    """Store on Redis (the stack's state database), shared by every process of the service."""

    PREFIX = "clinragen:cds:"

    def __init__(self, url: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5,
                                           socket_connect_timeout=5)

    def add(self, key: str, ttl_s: int) -> bool:
        return bool(self._redis.set(self.PREFIX + key, "1", nx=True, ex=max(1, ttl_s)))

    def put(self, key: str, value: str, ttl_s: int) -> None:
        self._redis.set(self.PREFIX + key, value, ex=max(1, ttl_s))

    def get(self, key: str) -> str | None:
        value = self._redis.get(self.PREFIX + key)
        return value if isinstance(value, str) else None


# -- configuration --------------------------------------------------------------------------
def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def load_keys(text: str) -> dict[str, Any]:
    """Verification keys by kid ("" for a lone PEM key): a JWKS document or one PEM public key.

    Private or symmetric keys are refused: the service only ever needs the EHR's public key, and
    an `oct` key would let whoever holds it (not only the EHR) sign requests."""
    text = text.strip()
    if text.startswith("{"):
        keys: dict[str, Any] = {}
        for jwk in jwt.PyJWKSet.from_json(text).keys:
            if jwk.key_type == "oct":
                raise ValueError("the CDS JWT key set holds a symmetric (oct) key: refused")
            if getattr(jwk, "_jwk_data", {}).get("d"):
                raise ValueError("the CDS JWT key set holds a private key: give public keys")
            keys[jwk.key_id or ""] = jwk.key
        if not keys:
            raise ValueError("the CDS JWT key set is empty")
        return keys
    if "PRIVATE KEY" in text:
        raise ValueError("the CDS JWT key file holds a private key: give the EHR's public key")
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    return {"": load_pem_public_key(text.encode())}


@dataclass
class JwtAuth:
    """What a CDS client's token must match: one issuer and its public keys."""

    issuer: str
    keys: dict[str, Any]  # kid -> public key ("" matches a token without kid)


@dataclass
class CdsConfig:
    """The service's settings as it runs them (`from_settings`: `[cds_hooks]` checked)."""

    auth: JwtAuth | None  # None: no auth, refused off loopback (`check_bind`)
    base_url: str = ""  # public URL the EHR calls, e.g. https://cds.example.org: JWT audience
    link_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    report_url: str = ""  # optional template with {id} (and {version}): the link target
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = MAX_BODY_BYTES
    card_ttl_s: int = CARD_TTL_S
    link_ttl_s: int = LINK_TTL_S

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if self.auth is not None and not self.base_url:
            raise ValueError("CDS JWT auth needs cds_hooks.base_url (CLINRAGEN_CDS_HOOKS__BASE_URL"
                             ": the audience the EHR signs for)")
        if self.report_url and "{id}" not in self.report_url:
            raise ValueError("cds_hooks.report_url (CLINRAGEN_CDS_HOOKS__REPORT_URL) must hold "
                             "{id}")

    @classmethod
    def from_settings(cls, settings: CdsHooksSettings) -> CdsConfig:
        """The service's settings (`[cds_hooks]`, CLINRAGEN_CDS_HOOKS__*) checked and loaded: a
        missing or unsafe one is an error here, at start, not a refused request later."""
        auth: JwtAuth | None = None
        if settings.auth == "jwt":
            if not settings.jwt_issuer or settings.jwt_keys_file is None:
                raise ValueError("set cds_hooks.jwt_issuer and cds_hooks.jwt_keys_file "
                                 "(CLINRAGEN_CDS_HOOKS__JWT_ISSUER, _JWT_KEYS_FILE: the EHR's "
                                 "public key or JWKS), or cds_hooks.auth = \"none\" for a "
                                 "loopback-only test service")
            auth = JwtAuth(settings.jwt_issuer, load_keys(_read(str(settings.jwt_keys_file))))
        secret = settings.link_secret()  # FhirConfigError: unreadable, short, a placeholder
        extra: dict[str, Any] = {"link_secret": secret.get_secret_value().encode()} \
            if secret is not None else {}
        return cls(auth=auth, base_url=settings.base_url, report_url=settings.report_url,
                   cors_origins=settings.origins(), **extra)

    @classmethod
    def from_env(cls) -> CdsConfig:
        """`from_settings` of the settings as configured now (the TOML and the environment)."""
        from clinragen_fhir.config import Settings

        return cls.from_settings(Settings().cds_hooks)

    def check_bind(self, host: str) -> None:
        """Refuse to serve without auth anywhere but loopback (an open service would hand any
        caller on the network every patient's diagnoses)."""
        if self.auth is None and not is_loopback(host):
            raise ValueError(f"the CDS Hooks service binds {host} without JWT auth: set "
                             "cds_hooks.jwt_issuer and cds_hooks.jwt_keys_file")


# -- auth -----------------------------------------------------------------------------------
def check_token(header: str | None, auth: JwtAuth, audiences: list[str], seen: Store,
                now: float | None = None) -> str | None:
    """None if the bearer JWT is the EHR's and fresh, else the reason (no token content)."""
    if not header or not header.lower().startswith("bearer "):
        return "no bearer token"
    token = header[7:].strip()
    try:
        head = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        return "malformed token"
    if head.get("alg") not in JWT_ALGORITHMS:
        return "algorithm not allowed"
    kid = head.get("kid") or ""
    key = auth.keys[kid] if kid in auth.keys else auth.keys.get("")  # "": a lone PEM key
    if key is None:
        return "unknown key"
    now = time.time() if now is None else now
    try:
        claims = jwt.decode(token, key, algorithms=JWT_ALGORITHMS, audience=audiences,
                            issuer=auth.issuer, leeway=LEEWAY_S,
                            options={"require": ["iss", "aud", "exp", "iat", "jti"],
                                     "verify_iat": False, "verify_exp": False,
                                     "verify_nbf": False})
    except jwt.InvalidAudienceError:
        return "wrong audience"
    except jwt.InvalidIssuerError:
        return "wrong issuer"
    except jwt.MissingRequiredClaimError as exc:
        return f"token lacks {exc.claim}"
    except jwt.InvalidTokenError:
        return "bad signature or claims"
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return "bad exp"
    if exp < now - LEEWAY_S:  # checked here against `now`, so tests (and replays) are exact
        return "token expired"
    if exp > now + MAX_TOKEN_LIFE_S + LEEWAY_S:
        return "token lives longer than five minutes"
    jti = claims.get("jti")
    if not isinstance(jti, str) or not 0 < len(jti) <= 256:
        return "bad jti"
    digest = hashlib.sha256(f"{auth.issuer}\n{jti}".encode()).hexdigest()
    if not seen.add(f"jti:{digest}", int(exp - now) + 2 * LEEWAY_S):
        return "token replayed (jti seen)"
    return None


# -- the card -------------------------------------------------------------------------------
def md(text: str) -> str:
    """Text for a Markdown field: server-held names must not become links or markup."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(text.split()))


# the card leads with what the clinician may not know: suspected, not on the problem list;
# "" is a report from before the problem-list check (its disorders read as suspected, as then)
_CARD_ORDER = (SUSPECTED, "", NOT_CHECKED, KNOWN)
_CARD_HEADINGS = {SUSPECTED: "Suspected, not on the problem list", "": "Suspected",
                  NOT_CHECKED: "Concluded (problem list not checked)",
                  KNOWN: "Known (on the problem list)"}


def disorders_by_status(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name, problem-list status) of each concluded disorder (SNOMED display, else the code),
    suspected ones first, each group in the report's order; status "" on reports written
    before the problem-list check (`report.problem_list`'s extension)."""
    out: dict[str, str] = {}
    for cc in report.get("conclusionCode") or []:
        if not isinstance(cc, dict):
            continue
        for c in cc.get("coding") or []:
            if isinstance(c, dict) and c.get("system") == SNOMED and c.get("code"):
                status = read_extension(cc).get("status", "")
                out.setdefault(str(c.get("display") or cc.get("text") or c["code"]),
                               status if status in _CARD_ORDER else "")
                break
    return sorted(out.items(), key=lambda kv: _CARD_ORDER.index(kv[1]))


def disorders(report: Mapping[str, Any]) -> list[str]:
    """The report's concluded disorders, suspected ones first (`disorders_by_status`)."""
    return [name for name, _ in disorders_by_status(report)]


def claim_counts(report: Mapping[str, Any]) -> tuple[int, int] | None:
    """(matched, claims) from the `rationale-lab-claims` extension; None on older reports."""
    for ext in report.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == f"{EXT_BASE}/rationale-lab-claims":
            parts = {p.get("url"): p.get("valueInteger") for p in ext.get("extension") or []
                     if isinstance(p, dict)}
            claims, matched = parts.get("claims"), parts.get("matched")
            if isinstance(claims, int) and isinstance(matched, int):
                return matched, claims
    return None


def summary_of(names: list[str]) -> str:
    """The card's one line: at most MAX_DISORDERS names, the rest counted, under 140 chars."""
    shown, rest = names[:MAX_DISORDERS], len(names) - MAX_DISORDERS
    text = "ClinRaGen (preliminary): " + ", ".join(shown) + (f", +{rest} more" if rest > 0
                                                             else "")
    return text if len(text) <= SUMMARY_CHARS else text[:SUMMARY_CHARS - 1] + "\u2026"


def build_card(report: Mapping[str, Any], link: str, card_id: str) -> dict[str, Any]:
    """The CDS Hooks card for one stored report: suspected disorders first, then those whose
    problem list was not checked, then the known ones (already on the problem list)."""
    found = disorders_by_status(report)
    names = [f"{n} (known)" if status == KNOWN else n for n, status in found]
    shown = found[:MAX_DISORDERS]
    lines = [f"**{_CARD_HEADINGS[status]}:** " + "; ".join(md(n) for n, s in shown if s == status)
             for status in _CARD_ORDER if any(s == status for _, s in shown)]
    if len(found) > MAX_DISORDERS:
        lines[-1] += f" (and {len(found) - MAX_DISORDERS} more in the report)"
    counts = claim_counts(report)
    if counts is not None:
        matched, claims = counts
        lines.append(f"**Rationale:** {matched} of {claims} lab claims checked match this "
                     "patient's record." if claims else
                     "**Rationale:** makes no lab claim that could be checked against the "
                     "record.")
    issued = str(report.get("issued") or "")[:10]
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", issued):
        lines.append(f"Report of {issued}, status {md(str(report.get('status', '')))}.")
    lines.append(DISCLAIMER)
    return {
        "uuid": card_id,
        "summary": summary_of(names),
        "detail": "\n\n".join(lines),
        "indicator": "info",
        "source": {"label": f"{SOFTWARE} (machine-generated, preliminary)"},
        "links": [{"label": "Open the ClinRaGen report", "url": link, "type": "absolute"}],
        "overrideReasons": [{"system": OVERRIDE_SYSTEM, "code": c, "display": d}
                            for c, d in OVERRIDE_REASONS.items()],
    }


def latest_report(client: FhirClient, patient_id: str, system: str) -> dict[str, Any] | None:
    """The newest report this software wrote for the patient (one search page), skipping ones
    withdrawn as entered in error or cancelled."""
    params = {"subject": f"Patient/{patient_id}", "identifier": f"{system}|",
              "_sort": "-_lastUpdated", "_count": 5}
    for page in client.search_pages("DiagnosticReport", params):
        for entry in page.get("entry") or []:
            r = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(r, dict) or r.get("resourceType") != "DiagnosticReport":
                continue
            if r.get("status") in ("entered-in-error", "cancelled"):
                continue
            if any(isinstance(i, dict) and i.get("system") == system
                   for i in r.get("identifier") or []):
                return r
        break  # newest first: a first page without one means none worth showing
    return None


def sign_link(secret: bytes, report_id: str, version: str, expires: int) -> str:
    return hmac.new(secret, f"{report_id}|{version}|{expires}".encode(),
                    hashlib.sha256).hexdigest()


# -- validation -----------------------------------------------------------------------------
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


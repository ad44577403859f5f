"""Endpoint authentication as httpx.Auth flows: static bearer, OAuth2 client credentials,
and SMART Backend Services (a signed JWT client assertion, RS384 or ES384).

Tokens are cached until shortly before they expire and fetched again on expiry or on a 401.
SMART Backend Services needs a key id (`kid`); without a configured `token_url` the token
endpoint is read from `[base]/.well-known/smart-configuration` (the same TLS rules as the base
URL), and a key directory (`private_key_dir`, fhir/keys.py) signs with its newest key.
Secrets are held as SecretStr and never appear in reprs, errors or logs. A token that cannot be
sent in a header is refused when read: httpx's "Illegal header value" error quotes it.

The default scope is least privilege, made from `WORKER_ACCESS` (what the worker reads and
writes); `missing_scopes` compares a token's granted scope with it (`check-config`). Condition
search (`PROBLEM_LIST_ACCESS`) is added to both only while the problem-list check is on
(`[report] problem_list`, fhir/conditions.py): `worker_access`, `requested_scope`.
"""

from __future__ import annotations

import re
import ssl
import threading
import time
import uuid
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any, Literal

import httpx
import jwt
from pydantic import SecretStr

from clinragen_fhir.fhir import keys
from clinragen_fhir.fhir.client import parse_retry_after
from clinragen_fhir.fhir.errors import FhirConfigError, TokenError
from clinragen_fhir.fhir.urls import check_url

__all__ = ["PROBLEM_LIST_ACCESS", "WORKER_ACCESS", "WORKER_SCOPE", "BearerAuth",
           "ClientCredentialsAuth", "SmartBackendAuth", "TokenError", "header_safe",
           "missing_scopes", "requested_scope", "worker_access"]

EXPIRY_SKEW_S = 30.0  # refresh this long before the server says the token expires
_HEADER_TOKEN = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what a header value can carry

# Every FHIR interaction the worker makes, by resource type, in SMART v2 permission letters
# (c create, r read, u update, d delete, s search): the default scope is made of exactly these,
# and a scope-enforcing server refuses (and the worker dead-letters) whatever they lack.
# tests/unit/test_scopes.py records the requests of a real run and checks they match.
WORKER_ACCESS: dict[str, str] = {
    "Patient": "r",  # pipeline.gather_inputs: read by id
    "Observation": "s",  # gather_inputs and the poll task: search only
    "DocumentReference": "s",
    # find_current searches by identifier; the report is a conditional update
    # (PUT DiagnosticReport?identifier=...): its condition is a search in the client's name,
    # and it creates the first time, updates (a new version) after: c, u and s
    "DiagnosticReport": "cus",
    "Device": "cs",  # the application Device: a conditional create as well
    "Provenance": "cu",  # PUT Provenance/<id>: an update that creates the first time
    "AuditEvent": "cu",  # POST (read and failure events), PUT AuditEvent/<id> (write events)
}
WORKER_SCOPE = " ".join(f"system/{t}.{p}" for t, p in WORKER_ACCESS.items())
# Only while the site turns the problem-list check on (fhir.conditions.read_problem_list): the
# patient's active Conditions, searched at report time (never a model input)
PROBLEM_LIST_ACCESS: dict[str, str] = {"Condition": "s"}


def worker_access(problem_list: bool = False) -> dict[str, str]:
    """What the worker reads and writes: `WORKER_ACCESS`, plus `PROBLEM_LIST_ACCESS` while the
    problem-list check is on (`problem_list`: `[report] problem_list`, which the caller reads:
    config.problem_list_enabled)."""
    return {**WORKER_ACCESS, **PROBLEM_LIST_ACCESS} if problem_list else dict(WORKER_ACCESS)


def requested_scope(scope: str | None, problem_list: bool = False) -> str | None:
    """The scope a token is asked for: the default (`WORKER_SCOPE`) gains
    `system/Condition.s` while the problem-list check is on, and only then; a scope the site
    configured is sent as configured (`check-config` names what it lacks)."""
    if scope == WORKER_SCOPE:
        return " ".join(f"system/{t}.{p}" for t, p in worker_access(problem_list).items())
    return scope
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}  # SMART v1 names, as v2 letters
SMART_CONFIGURATION = ".well-known/smart-configuration"
DISCOVERY_TTL_S = 3600.0  # a discovered token endpoint is kept this long, per process
# base URL -> (token endpoint, monotonic time it was read): a worker builds a client per task
_discovered: dict[str, tuple[str, float]] = {}
_SCOPE = re.compile(r"system/([A-Za-z]+|\*)\.(read|write|\*|c?r?u?d?s?)")


def granted_access(scope: str) -> dict[str, set[str]]:
    """What a granted scope string allows the system client, by type (`*`: every type), as v2
    letters; SMART v1 `.read`/`.write` are translated. `patient/` and `user/` scopes give a
    backend client nothing, and a scope narrowed by a query (`?category=...`) is not counted:
    whether it covers the worker's searches cannot be told from the string."""
    access: dict[str, set[str]] = {}
    for part in scope.split():
        m = _SCOPE.fullmatch(part)
        if m and m.group(2):
            access.setdefault(m.group(1), set()).update(_V1.get(m.group(2), m.group(2)))
    return access


def missing_scopes(granted: str, needed: Mapping[str, str] = WORKER_ACCESS) -> list[str]:
    """The scopes `granted` lacks of `needed`, one per type with the letters missing, e.g.
    `system/AuditEvent.cu`; empty when everything is covered."""
    access = granted_access(granted)
    missing = []
    for rtype, letters in needed.items():
        have = access.get(rtype, set()) | access.get("*", set())
        lack = "".join(c for c in letters if c not in have)
        if lack:
            missing.append(f"system/{rtype}.{lack}")
    return missing


def header_safe(token: SecretStr) -> SecretStr:
    """The token without surrounding whitespace (a file's trailing newline), or ValueError if
    what is left cannot go in an Authorization header (the error never quotes it)."""
    value = token.get_secret_value().strip()
    if not _HEADER_TOKEN.fullmatch(value):
        raise ValueError("empty, or has a space, newline or non-ASCII character")
    return SecretStr(value)


class BearerAuth(httpx.Auth):
    """A static bearer token."""

    def __init__(self, token: SecretStr) -> None:
        try:
            self._token = header_safe(token)
        except ValueError as exc:
            raise FhirConfigError(f"bearer token unusable: {exc}") from None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        yield request


class _CachedTokenAuth(httpx.Auth):
    """Fetches an access token from a token endpoint and caches it until expiry."""

    requires_response_body = False

    def __init__(self, token_url: str | None, scope: str | None,
                 verify: bool | ssl.SSLContext = True, timeout: float = 30.0,
                 allow_insecure_http: bool = False, transport: httpx.BaseTransport | None = None,
                 discovery_base: str | None = None, problem_list: bool = False) -> None:
        # the client secret goes to the token URL; the discovery base is asked where that is
        if token_url:
            check_url(token_url, "token_url", allow_insecure_http)
        elif discovery_base:
            check_url(discovery_base, "FHIR base URL (token endpoint discovery)",
                      allow_insecure_http)
        else:
            raise FhirConfigError("a token endpoint needs token_url (or a FHIR base URL that "
                                  f"serves {SMART_CONFIGURATION})")
        self.token_url = token_url
        self._discovery_base = discovery_base
        self._allow_insecure_http = allow_insecure_http
        self._transport = transport
        self.scope = requested_scope(scope, problem_list)  # + Condition while the check is on
        self._verify = verify
        self._timeout = timeout
        self._lock = threading.Lock()
        self._token: SecretStr | None = None
        self._expires_at = 0.0
        self.fetches = 0  # how many tokens were fetched (for tests and metrics)
        # the last token answer's `scope`; OAuth lets it be left out when it is the requested
        # one (RFC 6749 section 5.1), and then this is the requested scope
        self.granted_scope: str | None = None

    def token_endpoint(self) -> str:
        """The token URL: configured, else `token_endpoint` of the server's SMART configuration
        (kept for DISCOVERY_TTL_S in the process), held to the same TLS rule as the base URL."""
        if self.token_url:
            return self.token_url
        assert self._discovery_base is not None
        url = f"{self._discovery_base.rstrip('/')}/{SMART_CONFIGURATION}"
        cached = _discovered.get(url)
        if cached and time.monotonic() - cached[1] < DISCOVERY_TTL_S:
            check_url(cached[0], f"token_endpoint of {SMART_CONFIGURATION}",
                      self._allow_insecure_http)  # read for an endpoint that may allow more
            self.token_url = cached[0]
            return cached[0]
        try:
            with httpx.Client(verify=self._verify, timeout=self._timeout,
                              transport=self._transport) as http:
                response = http.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise TokenError(f"{SMART_CONFIGURATION} unreachable: {type(exc).__name__}",
                             unreachable=True) from None
        if response.status_code != 200:
            raise TokenError(f"{SMART_CONFIGURATION} answered HTTP {response.status_code}: "
                             "set token_url", status=response.status_code,
                             retry_after=parse_retry_after(response.headers.get("Retry-After")))
        try:
            endpoint = response.json()["token_endpoint"]
        except (ValueError, KeyError, TypeError):
            endpoint = None
        if not isinstance(endpoint, str) or not endpoint:
            raise TokenError(f"{SMART_CONFIGURATION} names no token_endpoint: set token_url")
        check_url(endpoint, f"token_endpoint of {SMART_CONFIGURATION}", self._allow_insecure_http)
        _discovered[url] = (endpoint, time.monotonic())
        self.token_url = endpoint
        return endpoint

    def _form(self) -> dict[str, str]:
        raise NotImplementedError

    def _basic_auth(self) -> tuple[str, str] | None:
        return None

    def _fetch(self) -> None:
        form = {"grant_type": "client_credentials", **self._form()}
        if self.scope:
            form["scope"] = self.scope
        try:
            with httpx.Client(auth=self._basic_auth(), verify=self._verify,
                              timeout=self._timeout, transport=self._transport) as http:
                response = http.post(self.token_endpoint(), data=form,
                                     headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:  # its text can quote what was sent: only the type
            raise TokenError(f"token endpoint unreachable: {type(exc).__name__}",
                             unreachable=True) from None
        if response.status_code != 200:
            raise TokenError(f"token endpoint answered HTTP {response.status_code}: "
                             f"{_oauth_error(response)}", status=response.status_code,
                             retry_after=parse_retry_after(response.headers.get("Retry-After")))
        try:
            body: dict[str, Any] = response.json()
            token = header_safe(SecretStr(str(body["access_token"])))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TokenError("token endpoint answer has no usable access_token") from None
        self._token = token
        self._expires_at = time.monotonic() + float(body.get("expires_in", 300)) - EXPIRY_SKEW_S
        granted = body.get("scope")
        self.granted_scope = granted if isinstance(granted, str) else self.scope
        self.fetches += 1

    def token(self, force: bool = False) -> SecretStr:
        with self._lock:
            if force or self._token is None or time.monotonic() >= self._expires_at:
                try:
                    self._fetch()
                except TokenError as exc:  # counted for the token-failure alert
                    from clinragen_fhir import metrics  # late: see metrics' multiprocess note

                    metrics.token_failure(exc.status, exc.retryable)
                    raise
            assert self._token is not None
            return self._token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token().get_secret_value()}"
        response = yield request
        if response.status_code == 401:  # revoked or expired early: one fresh token, once
            request.headers["Authorization"] = f"Bearer {self.token(force=True).get_secret_value()}"
            yield request


def _oauth_error(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body.get("error_description") or body.get("error"))[:200]
    except (ValueError, AttributeError):  # not JSON, or JSON that is not an object
        return response.text[:200]


class ClientCredentialsAuth(_CachedTokenAuth):
    """OAuth2 client credentials grant with client_secret_basic."""

    def __init__(self, token_url: str, client_id: str, client_secret: SecretStr,
                 scope: str | None = None, **kw: Any) -> None:
        super().__init__(token_url, scope, **kw)
        self.client_id = client_id
        self._secret = client_secret

    def _form(self) -> dict[str, str]:
        return {}

    def _basic_auth(self) -> tuple[str, str]:
        return (self.client_id, self._secret.get_secret_value())


class SmartBackendAuth(_CachedTokenAuth):
    """SMART Backend Services: client_credentials with a private_key_jwt client assertion.

    The key is a PEM with its `kid` (required: the token endpoint finds the key by it in the
    client's registered JWKS), or a `keys generate` directory (`key_dir`), read again at each
    token fetch: its newest key signs, with the kid and alg of that key (fhir/keys.py)."""

    def __init__(self, token_url: str | None, client_id: str,
                 private_key_pem: SecretStr | None = None,
                 algorithm: Literal["RS384", "ES384"] = "RS384", kid: str | None = None,
                 scope: str | None = WORKER_SCOPE, key_dir: Path | None = None,
                 **kw: Any) -> None:
        super().__init__(token_url, scope, **kw)
        self.client_id = client_id
        self.algorithm = algorithm
        self.kid = kid
        self._key = private_key_pem
        self._key_dir = key_dir
        if key_dir is not None:
            self._signing_key()  # fails closed now, not at the first token
        elif private_key_pem is None:
            raise FhirConfigError("smart-backend needs a private key or a key directory")
        elif not kid:
            raise FhirConfigError("smart-backend needs the key's kid (jwt_kid)")

    def _signing_key(self) -> tuple[str, str, str]:
        """(PEM, alg, kid) of the key that signs now."""
        if self._key_dir is not None:
            key = keys.newest(self._key_dir)
            self.algorithm, self.kid = key.alg, key.kid
            return key.pem.get_secret_value(), key.alg, key.kid
        assert self._key is not None and self.kid
        return self._key.get_secret_value(), self.algorithm, self.kid

    def assertion(self) -> str:
        """A fresh, short-lived JWT (5 min, unique jti) signed with our key, `kid` in its
        header; `aud` is the token endpoint (discovered if not configured)."""
        pem, alg, kid = self._signing_key()
        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": self.token_endpoint(),
                  "exp": now + 300, "iat": now, "jti": str(uuid.uuid4())}
        return jwt.encode(claims, pem, algorithm=alg, headers={"kid": kid, "typ": "JWT"})

    def _form(self) -> dict[str, str]:
        return {"client_assertion_type":
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": self.assertion()}

"""Endpoint authentication as httpx.Auth flows: static bearer, OAuth2 client credentials,
and SMART Backend Services (a signed JWT client assertion, RS384 or ES384).

Tokens are cached until shortly before they expire and fetched again on expiry or on a 401.
Secrets are held as SecretStr and never appear in reprs, errors or logs. A token that cannot be
sent in a header is refused when read: httpx's "Illegal header value" error quotes it.

The default scope is least privilege, made from `WORKER_ACCESS` (what the worker reads and
writes); `missing_scopes` compares a token's granted scope with it (`check-config`).
"""

from __future__ import annotations

import re
import ssl
import threading
import time
import uuid
from collections.abc import Generator, Mapping
from typing import Any, Literal

import httpx
import jwt
from pydantic import SecretStr

from clinragen_fhir.fhir.client import check_url, parse_retry_after
from clinragen_fhir.fhir.errors import FhirConfigError, TokenError

__all__ = ["WORKER_ACCESS", "WORKER_SCOPE", "BearerAuth", "ClientCredentialsAuth",
           "SmartBackendAuth", "TokenError", "header_safe", "missing_scopes"]

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
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}  # SMART v1 names, as v2 letters
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

    def __init__(self, token_url: str, scope: str | None, verify: bool | ssl.SSLContext = True,
                 timeout: float = 30.0, allow_insecure_http: bool = False,
                 transport: httpx.BaseTransport | None = None) -> None:
        check_url(token_url, "token_url", allow_insecure_http)  # the client secret goes there
        self.token_url = token_url
        self._transport = transport
        self.scope = scope
        self._verify = verify
        self._timeout = timeout
        self._lock = threading.Lock()
        self._token: SecretStr | None = None
        self._expires_at = 0.0
        self.fetches = 0  # how many tokens were fetched (for tests and metrics)
        # the last token answer's `scope`; OAuth lets it be left out when it is the requested
        # one (RFC 6749 section 5.1), and then this is the requested scope
        self.granted_scope: str | None = None

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
                response = http.post(self.token_url, data=form,
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
                self._fetch()
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
    """SMART Backend Services: client_credentials with a private_key_jwt client assertion."""

    def __init__(self, token_url: str, client_id: str, private_key_pem: SecretStr,
                 algorithm: Literal["RS384", "ES384"] = "RS384", kid: str | None = None,
                 scope: str | None = WORKER_SCOPE, **kw: Any) -> None:
        super().__init__(token_url, scope, **kw)
        self.client_id = client_id
        self.algorithm = algorithm
        self.kid = kid
        self._key = private_key_pem

    def assertion(self) -> str:
        """A fresh, short-lived JWT (5 min, unique jti) signed with our key."""
        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
                  "exp": now + 300, "iat": now, "jti": str(uuid.uuid4())}
        headers = {"kid": self.kid} if self.kid else None
        return jwt.encode(claims, self._key.get_secret_value(), algorithm=self.algorithm,
                          headers=headers)

    def _form(self) -> dict[str, str]:
        return {"client_assertion_type":
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": self.assertion()}

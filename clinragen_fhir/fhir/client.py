"""A thin synchronous FHIR R4 REST client over httpx (in the spirit of fhirpy).

It knows only what the worker needs: search with paging, read, transaction, capabilities.
Bounded retries for transient failures (the retry policy, clinragen_fhir/retry.py); every
error is a FhirError naming method and path.
Every answer is read as a stream under byte caps (on the wire and decoded: fhir/bodies.py), and
a search under a page limit, a byte budget and a cycle check: a server's answer cannot exhaust
the worker. What of a request may be logged is fhir/urls.py's.

Over 400 lines because FhirClient is one class: read, search (paging and its bounds), batch
and transaction share its one send path (retries, rate limit, caps, redacted errors).
"""

from __future__ import annotations

import email.utils
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

import httpx

from clinragen_fhir.fhir.bodies import (
    ACCEPT_ENCODING,
    MAX_RESPONSE_BYTES,
    MAX_WIRE_BYTES,
    read_capped,
)
from clinragen_fhir.fhir.errors import (
    FhirError,
    FhirHTTPError,
    FhirTooLarge,
    FhirUnavailable,
    is_retryable,
)
from clinragen_fhir.fhir.urls import (
    Params,
    check_base_url,
    param_pairs,
    redact_path,
    redact_text,
    redact_url,
    sent_tokens,
)
from clinragen_fhir.retry import RetryPolicy

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
JsonDict = dict[str, Any]

MAX_SEARCH_BYTES = 256 * 1024 * 1024  # all pages of one search, decoded
MAX_PAGES = 1_000  # pages of one search


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _outcome_detail(body: Any) -> str:
    """An OperationOutcome's diagnostics (a batch entry's answer), else ""."""
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        issues = body.get("issue") or []
        texts = [str(i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code"))
                 for i in issues if isinstance(i, dict)]
        return "; ".join(texts)[:500]
    return ""


def _json_bytes(value: Any) -> bytes:
    """A decoded answer's size as JSON, for the search byte budget of a batch entry."""
    return json.dumps(value, separators=(",", ":")).encode()


def _outcome_text(response: httpx.Response) -> str:
    """The OperationOutcome diagnostics, else a short slice of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    return _outcome_detail(body) or str(body)[:300]


def _page_key(url: str) -> str:
    """A paging URL normalised for the cycle check: scheme and host lowercased, the query's
    parameters sorted and re-encoded (`a=1&b=2` and `b=2&a=1` are one page)."""
    parts = urlsplit(url)
    query = urlencode(sorted(parse_qsl(parts.query, keep_blank_values=True)))
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}?{query}"


def _searchset(bundle: JsonDict) -> JsonDict:
    """A search answer whose `entry` and `link` are lists of objects, else a FhirError (a
    broken server answer fails the task visibly instead of crashing it with a TypeError)."""
    for key in ("entry", "link"):
        items = bundle.get(key)
        if items is not None and (not isinstance(items, list)
                                  or not all(isinstance(i, dict) for i in items)):
            raise FhirError(f"search answer's {key} is not a list of objects")
    return bundle


def _tls_reason(exc: BaseException) -> str:
    """OpenSSL's reason code from the exception chain ("CERTIFICATE_VERIFY_FAILED"): a fixed
    name that says what to fix, unlike the exception's text."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLError) and isinstance(cause.reason, str):
            return f" ({cause.reason})"
        cause = cause.__cause__ or cause.__context__
    return ""


class TokenBucket:
    """At most `rate` requests a second on average, bursts of `burst`; thread-safe.

    Hospital FHIR servers (and their gateways) set request quotas per client; staying under
    them is cheaper than being answered 429. The bucket is per client object, so per worker
    process: N processes may send N x `rate` together (see docs/integration.md).
    """

    def __init__(self, rate: float, burst: int = 0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0 requests/s")
        self.rate = rate
        self.capacity = float(burst if burst > 0 else max(1, int(rate)))
        self._tokens = self.capacity
        self._clock, self._sleep = clock, sleep
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping until one is there; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1.0
            wait = 0.0 if self._tokens >= 0 else -self._tokens / self.rate
        if wait > 0:  # the debt is ours: later callers queue behind it
            self._sleep(wait)
        return wait


class FhirClient:
    """One FHIR endpoint. Thread-compatible, not shared across processes."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: httpx.Auth | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        verify: bool | ssl.SSLContext = True,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        page_size: int = 200,
        max_pages: int = MAX_PAGES,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        max_wire_bytes: int = MAX_WIRE_BYTES,
        max_search_bytes: int = MAX_SEARCH_BYTES,
        allow_insecure_http: bool = False,
        transport: httpx.BaseTransport | None = None,
        observer: Callable[[str, int | None], None] | None = None,
        rate_limit: float = 0.0,
        rate_burst: int = 0,
    ) -> None:
        self.base_url = check_base_url(base_url, allow_insecure_http)
        # requests/s to this endpoint (0: unlimited); every attempt, retries included, counts
        self.bucket = TokenBucket(rate_limit, rate_burst) if rate_limit > 0 else None
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.page_size = page_size
        self.max_pages = max_pages
        self.max_response_bytes = max_response_bytes
        self.max_wire_bytes = max_wire_bytes
        self.max_search_bytes = max_search_bytes
        self.observer = observer  # called with (method, status or None) for every exchange
        self._http = httpx.Client(
            base_url=self.base_url + "/",
            auth=auth,
            headers={"Accept": FHIR_JSON, "Accept-Encoding": ACCEPT_ENCODING, **(headers or {})},
            timeout=timeout,
            verify=verify,
            transport=transport,
            follow_redirects=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------
    def policy(self) -> RetryPolicy:
        """This client's layer of the retry policy (clinragen_fhir/retry.py): `retries` + 1
        tries of one request, for the errors that say so themselves (`FhirError.retryable`:
        no answer, a timeout, 408, 429, 5xx, a write's 409, a token endpoint blip); a
        Retry-After over `max_backoff` goes to the task at once (its countdown honours it)."""
        return RetryPolicy(attempts=self.retries + 1, backoff_s=self.backoff,
                           max_backoff_s=self.max_backoff, retry_on=is_retryable,
                           defer_long_waits=True)

    def _send(self, method: str, url: str, *, params: Params | None = None,
              json: Any = None, headers: Mapping[str, str] | None = None,
              where: str | None = None) -> httpx.Response:
        """One request, retried by this client's layer of the retry policy (`policy`).

        The answer is streamed and read under the byte caps (`read_capped`); what is returned
        holds the decoded body (no Content-Encoding left on it). `where`: the request's name in
        logs and errors (default: its URL, redacted).
        """
        path = where or redact_url(url)

        def logged(failed: int, error: BaseException, delay: float) -> None:
            log.warning("fhir retry", extra={"fields": {
                "method": method, "path": path, "attempt": failed, "delay_s": round(delay, 2),
                "error": type(error).__name__, "status": getattr(error, "status", None)}})

        return self.policy().call(
            lambda: self._attempt(method, url, path, params=params, json=json, headers=headers),
            on_retry=logged)

    def _attempt(self, method: str, url: str, path: str, *, params: Params | None,
                 json: Any, headers: Mapping[str, str] | None) -> httpx.Response:
        """One try of a request: the answer (status < 400), else a FhirError saying whether a
        retry can help.

        A transport error's text is never kept: it can quote the request (httpx's "Illegal
        header value" quotes the Authorization header), and errors end in logs and dead letters.
        """
        hdrs = dict(headers or {})
        if json is not None:
            hdrs.setdefault("Content-Type", FHIR_JSON)
        try:
            if self.bucket is not None:
                self.bucket.acquire()
            request = self._http.build_request(method, url, json=json,
                                               params=param_pairs(params) or None, headers=hdrs)
            streamed = self._http.send(request, stream=True)
            try:
                body = read_capped(streamed, f"{method} {path}", self.max_response_bytes,
                                   self.max_wire_bytes)
            finally:
                streamed.close()
            response = httpx.Response(
                streamed.status_code, content=body, request=streamed.request,
                headers=[(k, v) for k, v in streamed.headers.multi_items() if k.lower()
                         not in ("content-encoding", "content-length", "transfer-encoding")])
        except httpx.TimeoutException as exc:
            self._observe(method, None)
            raise FhirUnavailable(f"{method} {path}: timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            self._observe(method, None)
            raise FhirUnavailable(f"{method} {path}: {type(exc).__name__}{_tls_reason(exc)}"
                                  ) from None
        except FhirError:  # the token endpoint (TokenError), a cap (FhirTooLarge)
            raise
        except httpx.HTTPError as exc:  # not transport (a body that does not decode): final
            raise FhirError(f"{method} {path}: {type(exc).__name__}") from None
        self._observe(method, response.status_code)
        if response.status_code < 400:
            return response
        detail = redact_text(_outcome_text(response), sent_tokens(url, params))
        raise FhirHTTPError(response.status_code, method, path, detail,
                            parse_retry_after(response.headers.get("Retry-After")))

    def _observe(self, method: str, status: int | None) -> None:
        if self.observer is not None:
            self.observer(method, status)

    def _json(self, response: httpx.Response) -> JsonDict:
        where = f"{response.request.method} {redact_path(response.request.url.path)}"
        try:
            body = response.json()
        except ValueError as exc:
            raise FhirError(f"{where}: answer is not JSON") from exc
        if not isinstance(body, dict):
            raise FhirError(f"{where}: answer is not a JSON object")
        return body

    # -- interactions ----------------------------------------------------------------------
    def capabilities(self) -> JsonDict:
        return self._json(self._send("GET", "metadata"))

    def read(self, resource_type: str, resource_id: str) -> JsonDict:
        return self._json(self._send("GET", f"{resource_type}/{resource_id}"))

    def search_pages(self, resource_type: str, params: Params) -> Iterator[JsonDict]:
        """Each searchset Bundle page as it arrives, following `next` links (same server only).

        A generator: the next page is asked for only once the caller is done with this one, so
        a consumer that stops early reads no more. Bounded, each with a final error: `max_pages`
        pages, `max_search_bytes` decoded bytes in all, and a `next` link to a page already
        read (a cycle would otherwise page until the limit, the same page each time).
        """
        response = self._send("GET", resource_type, params=self._query(params))
        first_url, total = str(response.request.url), len(response.content)
        bundle = _searchset(self._json(response))
        del response
        yield from self._paged(resource_type, bundle, first_url, total)

    def _query(self, params: Params) -> list[tuple[str, Any]]:
        """A search's parameters with this client's page size unless they name one."""
        pairs = param_pairs(params)  # repeated names kept (`date=ge…&date=le…`)
        return pairs if any(k == "_count" for k, _ in pairs) else \
            [("_count", self.page_size), *pairs]

    def _paged(self, resource_type: str, bundle: JsonDict, first_url: str,
               total: int) -> Iterator[JsonDict]:
        """The first page (already read, `total` bytes, asked for as `first_url`), then the
        pages its `next` links lead to, under the bounds `search_pages` names."""
        seen = {_page_key(first_url)}
        pages = 1
        while True:
            yield bundle
            next_url = next((link.get("url") for link in bundle.get("link") or []
                             if link.get("relation") == "next"), None)
            if not next_url:
                return
            if pages >= self.max_pages:
                raise FhirTooLarge(f"search {resource_type}: more than {self.max_pages} pages "
                                   "(max_pages)")
            self._same_origin(next_url)
            key = _page_key(urljoin(self.base_url + "/", str(next_url)))
            if key in seen:
                raise FhirError(f"search {resource_type}: the next link of page {pages} "
                                "leads back to a page already read (a paging cycle)")
            seen.add(key)
            del bundle  # one page held at a time
            response = self._send("GET", next_url)
            total += len(response.content)
            if total > self.max_search_bytes:
                raise FhirTooLarge(f"search {resource_type}: more than {self.max_search_bytes} "
                                   f"bytes in {pages + 1} pages (max_search_bytes)")
            bundle = _searchset(self._json(response))
            del response
            pages += 1

    def search_url(self, resource_type: str, params: Params) -> str:
        """A search as the relative URL of a batch entry (`Type?_count=...&...`)."""
        return f"{resource_type}?{urlencode(self._query(params), safe=',:|/')}"

    def batch(self, requests: Sequence[str]) -> list[JsonDict | FhirError]:
        """GET each relative URL (`Patient/1`, `Observation?...`, `search_url`) in one batch
        Bundle: one round trip. Each answer in order, the resource (a searchset Bundle for a
        search) or the FhirError its entry's status gives (the caller decides, as for a
        request of its own: `FhirHTTPError.retryable` says whether a retry can help). An
        answer that is not a batch-response of as many entries is a FhirError."""
        bundle = {"resourceType": "Bundle", "type": "batch",
                  "entry": [{"request": {"method": "GET", "url": url}} for url in requests]}
        named = ", ".join(redact_path(url.partition("?")[0]) for url in requests)
        answer = self._json(self._send("POST", "", json=bundle, where=f"batch[{named}]"))
        entries = answer.get("entry")
        if answer.get("resourceType") != "Bundle" or not isinstance(entries, list) or \
                len(entries) != len(requests) or not all(isinstance(e, dict) for e in entries):
            raise FhirError(f"batch of {len(requests)} reads: the answer is not a "
                            "batch-response with one entry per request")
        out: list[JsonDict | FhirError] = []
        for url, entry in zip(requests, entries, strict=True):
            path = redact_url(url)
            status_text = str((entry.get("response") or {}).get("status", ""))
            status = int(status_text[:3]) if status_text[:3].isdigit() else 0
            resource = entry.get("resource")
            if 200 <= status < 300:
                out.append(resource if isinstance(resource, dict) else
                           FhirError(f"GET {path}: answer is not a JSON object"))
                continue
            if not status:
                out.append(FhirError(f"GET {path}: batch entry without a status"))
                continue
            outcome = resource if isinstance(resource, dict) else \
                (entry.get("response") or {}).get("outcome")
            detail = redact_text(_outcome_detail(outcome), sent_tokens(url, None))
            out.append(FhirHTTPError(status, "GET", path, detail))
        return out

    def batch_search(self, reads: Sequence[tuple[str, Params | None]]
                     ) -> list[list[JsonDict] | FhirError]:
        """Reads (`(type/id, None)`) and searches (`(type, params)`) in one batch Bundle, each
        search then paged beyond its first page through its `next` links (one request a page,
        the bounds of `search_pages`: pages, bytes, cycles). Each answer in order: the
        resources (one for a read), or the FhirError of that entry; a failing page after the
        first raises, as in `search`."""
        urls = [rtype if params is None else self.search_url(rtype, params)
                for rtype, params in reads]
        out: list[list[JsonDict] | FhirError] = []
        for (rtype, params), url, answer in zip(reads, urls, self.batch(urls), strict=True):
            if isinstance(answer, FhirError) or params is None:
                out.append(answer if isinstance(answer, FhirError) else [answer])
                continue
            first = _searchset(answer)
            size = len(_json_bytes(first))
            if size > self.max_search_bytes:
                raise FhirTooLarge(f"search {rtype}: more than {self.max_search_bytes} bytes in "
                                   "1 page (max_search_bytes)")
            out.append([e["resource"] for page in self._paged(
                rtype, first, urljoin(self.base_url + "/", url), size)
                for e in page.get("entry", []) or [] if isinstance(e.get("resource"), dict)])
        return out

    def search(self, resource_type: str, params: Params) -> Iterator[JsonDict]:
        """Every matching resource (entries with search.mode 'include' too), across pages."""
        for page in self.search_pages(resource_type, params):
            for entry in page.get("entry", []) or []:
                resource = entry.get("resource")
                if isinstance(resource, dict):
                    yield resource

    def update(self, resource: JsonDict) -> JsonDict:
        """PUT a resource by its id (create-or-update; idempotent)."""
        path = f"{resource['resourceType']}/{resource['id']}"
        return self._json(self._send("PUT", path, json=resource))

    def delete(self, resource_type: str, resource_id: str, cascade: bool = False) -> None:
        """Delete one resource; `cascade` also deletes what refers to it (HAPI `_cascade`)."""
        self._send("DELETE", f"{resource_type}/{resource_id}",
                   params={"_cascade": "delete"} if cascade else None)

    def transaction(self, bundle: JsonDict) -> JsonDict:
        """POST a transaction (or batch) Bundle to the base; all-or-nothing on the server."""
        return self._json(self._send("POST", "", json=bundle))

    def _same_origin(self, url: str) -> None:
        """Paging links must stay on our server: credentials are never sent elsewhere."""
        ours, theirs = urlsplit(self.base_url), urlsplit(url)
        if theirs.scheme and (theirs.scheme, theirs.netloc) != (ours.scheme, ours.netloc):
            raise FhirError(f"server sent a paging link to another origin: {theirs.hostname}")

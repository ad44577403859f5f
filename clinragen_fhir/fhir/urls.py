"""Where a request goes and what of it may be logged: plain http refused off loopback, search
parameters as ordered pairs, and URLs, paths and server text with every id or value we sent
replaced by its hash (servers echo ids back; `next` links carry them)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from clinragen_fhir.fhir.errors import (
    FhirConfigError,
)
from clinragen_fhir.logs import hash_id

# search parameters: a mapping, or a sequence of (name, value) pairs where a name repeats
# (`birthdate=ge1950&birthdate=le1960`: a dict would keep only one of them)
Params = Mapping[str, Any] | Sequence[tuple[str, Any]]


def is_loopback(host: str) -> bool:
    """localhost or a loopback address: traffic that never leaves the machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: str, what: str, allow_insecure_http: bool = False) -> None:
    """Refuse plain http to a non-loopback host unless explicitly allowed: PHI, tokens and
    client secrets would cross the network in the clear."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FhirConfigError(f"{what} must be http(s)://host/...: {parts.scheme}://"
                              f"{parts.hostname or ''}")
    if parts.scheme == "http" and not is_loopback(parts.hostname) and not allow_insecure_http:
        raise FhirConfigError(
            f"refusing plain http to non-loopback host {parts.hostname} ({what}): use https, "
            "or set allow_insecure_http = true for this endpoint"
        )


def check_base_url(base_url: str, allow_insecure_http: bool = False) -> str:
    """The FHIR base URL without a trailing slash, if it passes `check_url`."""
    check_url(base_url, "FHIR base URL", allow_insecure_http)
    return base_url.rstrip("/")


def redact_url(url: str) -> str:
    """A request URL safe for logs and errors: the path as `redact_path`, every query value
    hashed (a server's `next` link can carry the patient id, or an opaque page token)."""
    parts = urlsplit(url)
    query = "&".join(f"{k}=#{hash_id(v)[:10]}" for k, v in parse_qsl(parts.query, True))
    return redact_path(parts.path) + (f"?{query}" if query else "")


def redact_path(path: str) -> str:
    """A request path safe for logs: ids after a resource type are replaced by their hash."""
    parts = path.split("/")
    return "/".join(
        f"#{hash_id(p)[:10]}" if i and parts[i - 1][:1].isupper() and p[:1] not in ("_", "$", "")
        else p for i, p in enumerate(parts))


_REFERENCE = re.compile(r"\b([A-Z][A-Za-z]{2,40})/([A-Za-z0-9\-.]{1,64})")


def redact_text(text: str, known: Iterable[str] = ()) -> str:
    """Server diagnostics safe for logs and errors: servers echo ids back ("Resource
    Patient/123 is not known"), so every `Type/id` and every id or value we sent (`known`)
    is replaced by its hash."""
    for token in sorted({t for t in known if len(t) >= 3}, key=len, reverse=True):
        text = text.replace(token, f"#{hash_id(token)[:10]}")
    return _REFERENCE.sub(lambda m: f"{m.group(1)}/#{hash_id(m.group(2))[:10]}", text)


def param_pairs(params: Params | None) -> list[tuple[str, Any]]:
    """Search parameters as (name, value) pairs in order, repeated names kept. A list or tuple
    value in a mapping is one pair per item, as httpx sends it (`{"issued": ["ge…", "le…"]}`:
    `recheck.list_reports`); sent as one pair, HAPI read `['ge…` and answered 400."""
    if params is None:
        return []
    if isinstance(params, Mapping):
        return [(str(k), x) for k, v in params.items()
                for x in (v if isinstance(v, list | tuple) else [v])]
    return [(str(k), v) for k, v in params]


def sent_tokens(url: str, params: Params | None) -> list[str]:
    """Ids in the path, values of the (non `_`) search parameters of a request, and the values
    in the URL's own query (a `next` link's: the patient id, an opaque page token), but for
    plain numbers in `_` parameters (`_count=200`)."""
    split = urlsplit(url)
    parts = split.path.split("/")
    tokens = [p for i, p in enumerate(parts)
              if i and parts[i - 1][:1].isupper() and p[:1] not in ("_", "$", "")]
    tokens += [v for k, v in parse_qsl(split.query, True) if not (k[:1] == "_" and v.isdigit())]
    for key, value in param_pairs(params):
        if not str(key).startswith("_"):
            tokens += [str(value), *re.split(r"[,|/]", str(value))]
    return tokens

"""Which patients a backfill covers: Bulk Data `$export` where the server offers it, search
where it does not (issue 14, item 6).

The export is the FHIR Bulk Data Access flow: a kick-off with `Prefer: respond-async`
(`Patient/$export`, or `Group/<id>/$export` for one cohort) answered 202 with a status URL in
Content-Location; that URL polled, waiting as Retry-After says (bounded by `max_wait_s`
each time and `timeout_s` in all); then the manifest's NDJSON outputs read through the
client, so every byte cap of a search applies (`max_response_bytes` per file,
`max_search_bytes` for all of them). The patients are the exported Patients and the subjects
of the exported Observations and DocumentReferences: with `_since`, everyone whose record
changed.

The search path asks the same question with `_lastUpdated`; a server whose capability
statement lists no `export` operation, or that refuses the kick-off (4xx), gets it.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from clinragen_fhir.fhir.client import FhirClient, JsonDict
from clinragen_fhir.fhir.errors import FhirError, FhirHTTPError, FhirTooLarge
from clinragen_fhir.fhir.urls import Params, param_pairs

log = logging.getLogger(__name__)

EXPORT_TYPES = ("Patient", "Observation", "DocumentReference")
NDJSON = "application/fhir+ndjson"


class ExportUnsupported(FhirError):
    """The server has no usable `$export` here: the caller searches instead."""


@dataclass
class Backfill:
    """The patients to diagnose, and how they were found ("export" or "search")."""

    patients: list[str]
    source: str
    transaction_time: str = ""  # the export's `transactionTime`: the next `_since`
    outputs: dict[str, int] = field(default_factory=dict)  # resources read, per type


def supports_export(capabilities: JsonDict, group: str | None = None) -> bool:
    """Whether the capability statement lists `$export` where we would call it: on Group for a
    group export, else on Patient (or at system level, which HAPI lists it at too)."""
    rest = next((r for r in capabilities.get("rest") or [] if r.get("mode") == "server"), None)
    if not isinstance(rest, dict):
        return False

    def named(ops: Any) -> bool:
        return any(isinstance(o, dict) and o.get("name") == "export" for o in ops or [])

    level = "Group" if group else "Patient"
    for resource in rest.get("resource") or []:
        if isinstance(resource, dict) and resource.get("type") == level and \
                named(resource.get("operation")):
            return True
    return not group and named(rest.get("operation"))


def _subject(resource: JsonDict) -> str | None:
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) and rid else None
    for key in ("subject", "patient"):
        ref = (resource.get(key) or {}).get("reference") if isinstance(
            resource.get(key), dict) else None
        if isinstance(ref, str) and ref.startswith("Patient/") and ref.count("/") == 1:
            return ref.split("/", 1)[1] or None
    return None


def _ndjson(body: bytes, where: str) -> Iterator[JsonDict]:
    """The resources of one NDJSON file; a Binary resource (what `Binary/<id>` answers when
    the server encodes it as FHIR JSON) is unwrapped first."""
    text = body.strip()
    if text.startswith(b"{") and b"\n" not in text:
        one = json.loads(text)
        if isinstance(one, dict) and one.get("resourceType") == "Binary":
            text = base64.b64decode(one.get("data") or "")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            resource = json.loads(line)
        except ValueError as exc:
            raise FhirError(f"{where}: line {n} is not JSON") from exc
        if isinstance(resource, dict):
            yield resource


def export_patients(client: FhirClient, *, since: str | None = None, group: str | None = None,
                    types: tuple[str, ...] = EXPORT_TYPES, timeout_s: float = 900.0,
                    max_wait_s: float = 30.0,
                    sleep: Callable[[float], None] = time.sleep) -> Backfill:
    """Kick off `$export`, wait for it, read its outputs: the patients they name.

    Raises ExportUnsupported when the kick-off is refused with a 4xx (no such operation, a
    parameter not supported), FhirError when the export fails or outlasts `timeout_s`."""
    path = f"Group/{group}/$export" if group else "Patient/$export"
    params: list[tuple[str, Any]] = [("_type", ",".join(types)),
                                     ("_outputFormat", NDJSON)]
    if since:
        params.append(("_since", since))
    try:
        kick = client._send("GET", path, params=params, headers={
            "Accept": "application/fhir+json", "Prefer": "respond-async"})
    except FhirHTTPError as exc:
        if 400 <= exc.status < 500 and exc.status not in (401, 403, 408, 429):
            raise ExportUnsupported(f"{path}: HTTP {exc.status}") from None
        raise
    status_url = kick.headers.get("Content-Location")
    if kick.status_code != 202 or not status_url:
        raise ExportUnsupported(f"{path}: answered {kick.status_code} without a status URL")
    client._same_origin(status_url)  # the credentials go only to our server
    started, slept = time.monotonic(), 0.0
    while True:
        answer = client._send("GET", status_url, headers={"Accept": "application/json"})
        if answer.status_code == 200:
            break
        if answer.status_code != 202:
            raise FhirError(f"{path}: status answered {answer.status_code}")
        wait = _retry_after(answer.headers.get("Retry-After"), max_wait_s)
        if max(time.monotonic() - started, slept) + wait > timeout_s:
            raise FhirError(f"{path}: not complete after {timeout_s:.0f} s (timeout_s)")
        sleep(wait)
        slept += wait
    manifest = client._json(answer)
    if manifest.get("error"):
        log.warning("bulk export reported errors", extra={"fields": {
            "files": len(manifest.get("error") or [])}})
    patients: set[str] = set()
    counts: dict[str, int] = {}
    total = 0
    for output in manifest.get("output") or []:
        url = output.get("url") if isinstance(output, dict) else None
        if not isinstance(url, str):
            continue
        client._same_origin(url)
        body = client._send("GET", url, headers={"Accept": NDJSON}).content
        total += len(body)
        if total > client.max_search_bytes:
            raise FhirTooLarge(f"{path}: outputs over {client.max_search_bytes} bytes "
                               "(max_search_bytes)")
        for resource in _ndjson(body, f"{path} output"):
            rtype = str(resource.get("resourceType"))
            counts[rtype] = counts.get(rtype, 0) + 1
            if (pid := _subject(resource)) is not None:
                patients.add(pid)
    return Backfill(sorted(patients), "export", str(manifest.get("transactionTime") or ""),
                    counts)


def _retry_after(value: str | None, cap: float) -> float:
    """Seconds to wait before polling again: Retry-After (seconds) within [0.5, cap]; 1 s
    when the server gives none or a date (a poll is cheap)."""
    try:
        seconds = float(value) if value is not None else 1.0
    except ValueError:
        seconds = 1.0
    return max(0.5, min(cap, seconds))


def search_patients(client: FhirClient, params: Params = (), since: str | None = None,
                    types: tuple[str, ...] = EXPORT_TYPES) -> Backfill:
    """The same answer by search: the matching Patients, or with `since` everyone whose
    Patient, Observations or DocumentReferences changed since then."""
    pairs = param_pairs(params)
    if since is None:
        if not any(k == "_elements" for k, _ in pairs):
            pairs.append(("_elements", "id"))
        ids = [str(p["id"]) for p in client.search("Patient", pairs)]
        return Backfill(ids, "search")
    patients: set[str] = set()
    counts: dict[str, int] = {}
    for rtype in types:
        query = [("_lastUpdated", f"ge{since}"),
                 ("_elements", "id" if rtype == "Patient" else "subject")]
        query += pairs if rtype == "Patient" else []
        for resource in client.search(rtype, query):
            counts[rtype] = counts.get(rtype, 0) + 1
            if (pid := _subject(resource)) is not None:
                patients.add(pid)
    return Backfill(sorted(patients), "search", "", counts)


def backfill_patients(client: FhirClient, params: Params = (), *, since: str | None = None,
                      group: str | None = None, use_export: bool = True,
                      **export_options: Any) -> Backfill:
    """The backfill's patients: by `$export` when asked for, the query has no search filters
    (an export cannot apply them) and the server lists the operation; else by search."""
    if use_export and not param_pairs(params):
        try:
            if supports_export(client.capabilities(), group):
                return export_patients(client, since=since, group=group, **export_options)
            log.info("bulk export not offered: searching", extra={"fields": {}})
        except ExportUnsupported as exc:
            log.info("bulk export refused: searching", extra={"fields": {"reason": str(exc)}})
    if group:
        raise FhirError(f"Group/{group}: this server has no $export; a group backfill needs it")
    return search_patients(client, params, since)

"""The patient's problem list: their active Conditions, read at report time.

The model never sees Conditions (it concludes from labs, vital signs and notes alone). After it
has concluded, and only where the site turns the check on (`[report] problem_list = true`,
CLINRAGEN_REPORT__PROBLEM_LIST=on by environment), the
worker searches `Condition?patient=<id>&clinical-status=active,recurrence,relapse` (every page,
under the client's read bounds) so the report can tell a disorder already on the problem list
from one only suspected (`report.problem_list`). The check off, or the search refused (401/403:
the Condition scope not granted; 404: no Condition search; any other final error), the result
says "not checked" and why: never "nothing is on the list". A transient failure (retried by the
client and still failing) is raised like every other read, so the task is retried.

Least privilege: `fhir.auth.worker_access` adds `Condition: s` to what the worker needs, and
the default scope asks for it, only while the check is on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping, MutableSequence
from dataclasses import dataclass
from typing import Any

from clinragen_fhir.config import problem_list_enabled
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.errors import FhirError, FhirHTTPError

# the setting `[report] problem_list` (config.ReportSettings) by environment: on | off (default
# off); the old CLINRAGEN_PROBLEM_LIST is refused with this name (config.LEGACY_ENV)
ENV = "CLINRAGEN_REPORT__PROBLEM_LIST"
# clinical-status codes that mean the problem is current (recurrence and relapse are kinds of
# active in condition-clinical); a search on `active` alone would miss them
ACTIVE = ("active", "recurrence", "relapse")
_NOT_A_PROBLEM = {"refuted", "entered-in-error"}  # verificationStatus: not on the list at all
OFF_REASON = "the problem list is not read at this site"
# what `check-config` asks of the CapabilityStatement while the check is on
PROBLEM_LIST_SEARCH: dict[str, tuple[str, ...]] = {"Condition": ("patient", "clinical-status")}


@dataclass(frozen=True)
class ListedCondition:
    """One active Condition as the report needs it."""

    reference: str  # "Condition/<id>/_history/<n>" (unversioned where the server gave none)
    codings: tuple[tuple[str, str, str], ...]  # (system, code, display)
    since: str = ""  # onset (dateTime or period start), else recordedDate: YYYY-MM-DD


@dataclass(frozen=True)
class ProblemList:
    """The patient's active Conditions, or why they were not read (`checked` False)."""

    checked: bool
    conditions: tuple[ListedCondition, ...] = ()
    reason: str = ""  # not checked: why, in words a clinician can read


def problem_query(patient_id: str) -> dict[str, Any]:
    return {"patient": patient_id, "clinical-status": ",".join(ACTIVE)}


def _since(resource: Mapping[str, Any]) -> str:
    period = resource.get("onsetPeriod")
    for value in (resource.get("onsetDateTime"),
                  period.get("start") if isinstance(period, Mapping) else None,
                  resource.get("recordedDate")):
        if isinstance(value, str) and len(value) >= 4:
            return value[:10]
    return ""


def _coded(value: Any, key: str) -> set[str]:
    concept = value.get(key) if isinstance(value, Mapping) else None
    return {str(c.get("code")) for c in (concept or {}).get("coding") or []
            if isinstance(c, Mapping)} if isinstance(concept, Mapping) else set()


def listed_condition(resource: Mapping[str, Any]) -> ListedCondition | None:
    """The Condition as listed, or None when it is not a current problem (not active, refuted or
    entered in error, or without a code): the server's filter is checked again here."""
    if resource.get("resourceType") != "Condition":
        return None
    clinical = _coded(resource, "clinicalStatus")
    if clinical and not clinical & set(ACTIVE):
        return None
    if _coded(resource, "verificationStatus") & _NOT_A_PROBLEM:
        return None
    code = resource.get("code")
    codings = tuple((str(c.get("system", "")), str(c.get("code")), str(c.get("display") or ""))
                    for c in ((code or {}).get("coding") or [] if isinstance(code, Mapping)
                              else []) if isinstance(c, Mapping) and c.get("code"))
    if not codings:
        return None
    meta = resource.get("meta")
    version = str(meta.get("versionId") or "") if isinstance(meta, Mapping) else ""
    ref = f"Condition/{resource.get('id', '?')}"
    return ListedCondition(f"{ref}/_history/{version}" if version else ref, codings,
                           _since(resource))


def _refused(exc: FhirError) -> str:
    if isinstance(exc, FhirHTTPError) and exc.status in (401, 403):
        return (f"the FHIR server refused the Condition search (HTTP {exc.status}): the "
                "Condition scope is not granted")
    if isinstance(exc, FhirHTTPError) and exc.status == 404:
        return "the FHIR server has no Condition search (HTTP 404)"
    status = f", HTTP {exc.status}" if isinstance(exc, FhirHTTPError) else ""
    return f"the Condition search failed ({type(exc).__name__}{status})"


def read_problem_list(client: FhirClient, patient_id: str,
                      queries: MutableSequence[tuple[str, dict[str, Any]]] | None = None,
                      n_read: MutableMapping[str, int] | None = None,
                      enabled: bool | None = None) -> ProblemList:
    """The patient's active Conditions, when the check is on (`enabled`, else the setting).

    The search is appended to `queries` and the count to `n_read` (the read AuditEvent's query
    entities and details) when given. Refused or failing for good: not checked, with the reason;
    a transient failure the client's retries did not cure is raised (the task is retried).
    (The worker reads the same search inside its batch of reads: `problem_list_of`.)"""
    if not (problem_list_enabled() if enabled is None else enabled):
        return ProblemList(False, reason=OFF_REASON)
    params = problem_query(patient_id)
    if queries is not None:
        queries.append(("Condition", params))
    found: list[dict[str, Any]] = []
    try:
        found.extend(client.search("Condition", params))
    except FhirError as exc:
        return problem_list_of(exc, n_read)
    return problem_list_of(found, n_read)


def problem_list_of(answer: Iterable[Mapping[str, Any]] | FhirError,
                    n_read: MutableMapping[str, int] | None = None) -> ProblemList:
    """The problem list from the answer to `problem_query` (the resources, or the error of that
    search, e.g. a batch entry's): a final error is "not checked" with the reason, a transient
    one is raised (the task is retried). The count of listed Conditions goes to `n_read`."""
    found: list[ListedCondition] = []
    try:
        if isinstance(answer, FhirError):
            if answer.retryable:
                raise answer
            return ProblemList(False, reason=_refused(answer))
        for resource in answer:
            listed = listed_condition(resource)
            if listed is not None:
                found.append(listed)
    finally:
        if n_read is not None:
            n_read["Condition"] = len(found)
    return ProblemList(True, tuple(found))

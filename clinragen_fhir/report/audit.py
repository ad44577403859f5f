"""AuditEvents (IHE BALP) for what the worker reads and writes: the events, the worker's
Device, the transaction they go in and the ids that make a retried write find its own event.

Re-checking written reports against the server's current data is `report.recheck`.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

from clinragen_fhir import __version__, tracing
from clinragen_fhir.fhir.errors import FhirHTTPError
from clinragen_fhir.logs import hash_id
from clinragen_fhir.report.build import (
    DEVICE_ID_SYSTEM,
    SOFTWARE,
    stable_uuid,
)

log = logging.getLogger(__name__)

APP_DEVICE = f"clinragen-fhir@{__version__}"  # the worker application, as an audit agent
_AUDIT_TYPE = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
               "code": "rest", "display": "RESTful Operation"}
_INTERACTION = "http://hl7.org/fhir/restful-interaction"
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_DCM = "http://dicom.nema.org/resources/ontology/DCM"
# IHE BALP's transaction entity type; its identifier here is the OpenTelemetry trace id
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
TRACE_ID_SYSTEM = "https://www.w3.org/TR/trace-context/#trace-id"
# IHE BALP: the purpose of use on each agent (the worker reads and writes for treatment)
PURPOSE_OF_USE = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                               "code": "TREAT", "display": "treatment"}]}]


# -- AuditEvents ------------------------------------------------------------------------------
def outcome_code(error: BaseException | None) -> str:
    """AuditEvent.outcome: 0 success, 4 minor failure (request refused), 8 serious failure."""
    if error is None:
        return "0"
    if isinstance(error, FhirHTTPError) and 400 <= error.status < 500:
        return "4"
    return "8"


def query_entity(patient_id: str, resource_type: str,
                 params: Mapping[str, Any]) -> dict[str, Any]:
    """IHE BALP's query entity: the search as sent, base64 in `entity.query`, with the patient's
    id replaced by its log hash (`logs.hash_id`), as log lines carry it."""
    redacted = {k: hash_id(patient_id) if str(v) in (patient_id, f"Patient/{patient_id}") else v
                for k, v in params.items()}
    text = f"{resource_type}?{urlencode(redacted, doseq=True, safe=',:|')}"
    return {"type": {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"},
            "role": {"system": _OBJECT_ROLE, "code": "24", "display": "Query"},
            "description": f"{resource_type} search",
            "query": base64.b64encode(text.encode()).decode()}


def transaction_entity(trace_id: str) -> dict[str, Any]:
    """IHE BALP's transaction entity (type `XrequestId`, the id that ties the event to the
    request that caused it), holding the W3C trace id of the trace this event was written in,
    so the audit record leads to the run's spans (clinragen_fhir/tracing.py) and back."""
    return {"what": {"identifier": {"system": TRACE_ID_SYSTEM, "value": trace_id}},
            "type": {"system": BALP_ENTITY_TYPE, "code": "XrequestId",
                     "display": "transport specific unique identifier where http X-Request-Id "
                                "is used"},
            "description": "OpenTelemetry trace id (W3C trace-context)"}


def audit_event(action: str, patient_id: str, *, interactions: Sequence[str],
                device_ref: str = "", details: Mapping[str, object] | None = None,
                error: BaseException | None = None,
                written: Mapping[str, Any] | None = None,
                now: datetime | None = None,
                organization: Mapping[str, Any] | None = None, server: str = "",
                queries: Sequence[tuple[str, Mapping[str, Any]]] = ()) -> dict[str, Any]:
    """One R4 AuditEvent in the IHE BALP shape: our application Device as the requesting
    (client) agent, the site's `organization` and the FHIR `server` as agents when given, each
    with the purpose of use; the patient (and report) as entity, and one query entity per
    search in `queries` ((type, parameters) as sent); with tracing on, a transaction entity
    holding the current trace id (`transaction_entity`).

    `device_ref` may stay empty when the event goes through `audit_bundle`, which sets it.
    `written` is a logical Reference (by identifier) to what was written: a literal reference
    would stop the server from ever deleting that resource (referential integrity on delete).
    """
    now = now or datetime.now(UTC)
    entities: list[dict[str, Any]] = [{
        "what": {"reference": f"Patient/{patient_id}"},
        "type": {"system": _ENTITY_TYPE, "code": "1", "display": "Person"},
        "role": {"system": _OBJECT_ROLE, "code": "1", "display": "Patient"},
        "detail": [{"type": k, "valueString": str(v)} for k, v in (details or {}).items()]}]
    if written:
        entities.append({"what": dict(written),
                         "type": {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"},
                         "role": {"system": _OBJECT_ROLE, "code": "3", "display": "Report"}})
    entities += [query_entity(patient_id, rtype, params) for rtype, params in queries]
    if (trace_id := tracing.trace_id()) is not None:
        entities.append(transaction_entity(trace_id))
    agents: list[dict[str, Any]] = [{
        "type": {"coding": [{"system": _DCM, "code": "110153", "display": "Source Role ID"}]},
        "role": [{"coding": [{"system": _DCM, "code": "110150", "display": "Application"}]}],
        "who": {"reference": device_ref, "display": APP_DEVICE},
        "requestor": True, "purposeOfUse": PURPOSE_OF_USE}]
    if organization:
        agents.append({"type": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-RoleClass", "code": "PROV",
            "display": "healthcare provider"}]}, "who": dict(organization),
            "requestor": False, "purposeOfUse": PURPOSE_OF_USE})
    if server:
        agents.append({"type": {"coding": [{"system": _DCM, "code": "110152",
                                            "display": "Destination Role ID"}]},
                       "who": {"identifier": {"system": "urn:ietf:rfc:3986", "value": server}},
                       "requestor": False,
                       "network": _network(server)})
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": _AUDIT_TYPE,
        "subtype": [{"system": _INTERACTION, "code": c} for c in interactions],
        "action": action,
        "recorded": now.isoformat(),
        "outcome": outcome_code(error),
        "agent": agents,
        "source": {"observer": {"reference": device_ref, "display": APP_DEVICE},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                             "code": "4", "display": "Application Server"}]},
        "entity": entities,
    }
    if error is not None:  # the error class only: messages may quote ids or server internals
        event["outcomeDesc"] = type(error).__name__
    return event


def _network(url: str) -> dict[str, str]:
    """AuditEvent.agent.network of a server: its host, type 1 (machine name) or 2 (IP address)."""
    host = urlsplit(url).hostname or url
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return {"address": host, "type": "1"}
    return {"address": host, "type": "2"}


def app_device_entry() -> tuple[str, dict[str, Any]]:
    """The application Device, conditionally created, and its urn for references in a Bundle."""
    urn = f"urn:uuid:{stable_uuid(APP_DEVICE, 'app-device')}"
    device = {"resourceType": "Device",
              "identifier": [{"system": DEVICE_ID_SYSTEM, "value": APP_DEVICE}],
              "deviceName": [{"name": f"{SOFTWARE} {__version__} worker", "type": "model-name"}],
              "version": [{"value": __version__}], "status": "active"}
    return urn, {"fullUrl": urn, "resource": device,
                 "request": {"method": "POST", "url": "Device",
                             "ifNoneExist": f"identifier={DEVICE_ID_SYSTEM}|{APP_DEVICE}"}}


def attempt_event_id(*parts: str) -> str:
    """A client-assigned AuditEvent id for one write attempt (`parts`: what identifies it).

    R4 AuditEvent has no identifier to make a conditional create on, so the write event of a
    report transaction goes in as `PUT AuditEvent/<this id>`: a transaction that the server
    committed but whose answer was lost, sent again verbatim (the client's retry), finds the
    same id and writes no second event (HAPI does not even add a version when nothing changed).
    Non-numeric, so HAPI accepts it as a client-assigned id; 50 characters (FHIR allows 64).
    """
    return "clinragen-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:40]


def audit_bundle(events: Iterable[dict[str, Any]],
                 ids: Sequence[str] | None = None) -> dict[str, Any]:
    """A transaction of AuditEvents that reference the application Device (created once).

    Events with an id in `ids` (same order as `events`) are PUT by that id (idempotent, see
    `attempt_event_id`); the others are POSTed (the server assigns an id)."""
    urn, device = app_device_entry()
    entries = [device]
    events = list(events)
    if ids is not None and len(ids) != len(events):
        raise ValueError("audit_bundle: one id per event")
    for i, ev in enumerate(events):
        for who in (ev["agent"][0]["who"], ev["source"]["observer"]):
            who["reference"] = urn
        if ids is not None:
            ev["id"] = ids[i]
            request = {"method": "PUT", "url": f"AuditEvent/{ids[i]}"}
        else:
            request = {"method": "POST", "url": "AuditEvent"}
        entries.append({"resource": ev, "request": request})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}

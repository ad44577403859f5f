"""A small fake FHIR server (for httpx.MockTransport) that keeps resources as a server does.

One patient with three HbA1c readings and no notes; transactions stored entry by entry: POST
assigns a new id, PUT keeps the client's, a conditional update (`Type?identifier=...`) updates
the match or creates, `ifNoneExist` matches an identifier already stored. Subclasses change one
step: `before_write` (a pause that opens a race), `after_transaction` (an answer lost after the
commit), `on_patient` (hold a run until another has started).
"""

from __future__ import annotations

import itertools
import json
import threading
from typing import Any

import httpx

from tests.observations import a1c


class StoreServer:
    def __init__(self, patient_id: str) -> None:
        self.patient_id = patient_id
        self.store: dict[tuple[str, str], dict[str, Any]] = {}
        self.ids = itertools.count(1)
        self.guard = threading.Lock()  # the dict itself, not a check-then-create

    # -- what subclasses change ----------------------------------------------------------------
    def before_write(self, rtype: str) -> None:
        """Called between a conditional write's check and its write."""

    def after_transaction(self, bundle: dict[str, Any]) -> httpx.Response | None:
        """An answer that replaces the committed transaction's, or None."""
        return None

    def on_patient(self) -> None:
        """Called when the Patient is read (the first read of a run)."""

    # -- the server ----------------------------------------------------------------------------
    def bundle(self, resources: list[dict[str, Any]]) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "searchset",
                "entry": [{"resource": r} for r in resources]}

    def match(self, rtype: str, query: str) -> str | None:
        """The id of a stored `rtype` with the identifier `identifier=system|value`."""
        system, _, value = query.removeprefix("identifier=").partition("|")
        with self.guard:
            return next((rid for (t, rid), r in self.store.items() if t == rtype and any(
                i.get("system") == system and i.get("value") == value
                for i in r.get("identifier", []))), None)

    def put_id(self, rtype: str, url: str) -> str:
        """PUT Type/id keeps the id; a conditional update (`Type?identifier=...`, the report
        lifecycle) updates the match, else creates with a new id, as HAPI does."""
        if "?" not in url:
            return url.split("/")[1]
        return self.match(rtype, url.partition("?")[2]) or str(next(self.ids))

    def of_type(self, rtype: str) -> list[dict[str, Any]]:
        with self.guard:
            return [r for (t, _), r in self.store.items() if t == rtype]

    def transaction(self, bundle: dict[str, Any]) -> httpx.Response:
        out = []
        for entry in bundle["entry"]:
            resource, request = entry["resource"], entry["request"]
            rtype = resource["resourceType"]
            condition = request.get("ifNoneExist")
            found = self.match(rtype, condition) if condition else None
            if found:  # as HAPI answers a conditional create that matched
                out.append({"response": {"status": "200 OK",
                                         "location": f"{rtype}/{found}/_history/1"}})
                continue
            rid = self.put_id(rtype, request["url"]) if request["method"] == "PUT" \
                else str(next(self.ids))
            self.before_write(rtype)
            with self.guard:
                self.store[(rtype, rid)] = {**resource, "id": rid}
            out.append({"response": {"status": "201 Created",
                                     "location": f"{rtype}/{rid}/_history/1"}})
        lost = self.after_transaction(bundle)
        if lost is not None:
            return lost
        return httpx.Response(200, json={"resourceType": "Bundle",
                                         "type": "transaction-response", "entry": out})

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/fhir").strip("/")
        if request.method == "POST" and path == "":
            return self.transaction(json.loads(request.content))
        if path == f"Patient/{self.patient_id}":
            self.on_patient()
            return httpx.Response(200, json={"resourceType": "Patient", "id": self.patient_id,
                                             "gender": "female", "birthDate": "1960-01-01"})
        if path == "Observation":
            return httpx.Response(200, json=self.bundle([
                {**a1c(self.patient_id, v, d, f"o{i}"), "meta": {"versionId": "1"}}
                for i, (v, d) in enumerate(((6.9, 400), (7.4, 200), (8.1, 20)))]))
        if path == "DiagnosticReport":
            found = self.match("DiagnosticReport", request.url.params.get("identifier", ""))
            with self.guard:
                hits = [self.store[("DiagnosticReport", found)]] if found else []
            return httpx.Response(200, json=self.bundle(hits))
        if path == "DocumentReference":
            return httpx.Response(200, json=self.bundle([]))
        return httpx.Response(404, json={"resourceType": "OperationOutcome"})

"""Servers without versionId: an edited input still gives a new report (issue 13, item 12).

The report key hashed `versionId`, or "" when the server sent none, so on such a server an edited
Observation kept the old key and `find_report` answered "exists": the change never got a report.
"""

from __future__ import annotations

import copy
from typing import Any

import httpx

from clinragen_fhir.config import ReportSettings
from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.knowledge import KnowledgeGraph, load_graph
from clinragen_fhir.pipeline import gather_inputs
from clinragen_fhir.predict.types import Prediction
from clinragen_fhir.report.build import InputRef, input_stamp, report_key
from tests.fhir_batch import batching
from tests.observations import a1c

PID = "p-noversion"
PREDICTION = Prediction("knowledge-rule-baseline", "1", "kg-abc", [], "")


def key_for(kg: KnowledgeGraph, observations: list[dict[str, Any]]) -> str:
    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/fhir").strip("/")
        if path == f"Patient/{PID}":
            return httpx.Response(200, json={"resourceType": "Patient", "id": PID})
        found = observations if path == "Observation" else []
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset",
                                         "entry": [{"resource": r} for r in found]})

    with FhirClient("http://127.0.0.1:9/fhir", transport=httpx.MockTransport(batching(handler)),
                    retries=0) as client:
        inputs = gather_inputs(client, kg, PID, ReportSettings())
    assert len(inputs.used) == len(observations)
    return report_key(PID, inputs.used, PREDICTION)


def test_an_edited_input_without_version_id_gives_a_new_report_key() -> None:
    kg = load_graph(None)
    before = [a1c(PID, 7.4, 30, "o1"), a1c(PID, 8.1, 10, "o2")]
    edited = copy.deepcopy(before)
    edited[1]["valueQuantity"]["value"] = 6.2  # same id, no meta: only the content changed
    assert key_for(kg, before) == key_for(kg, copy.deepcopy(before))  # same inputs, same key
    assert key_for(kg, edited) != key_for(kg, before)
    # lastUpdated is the version when the server sends it (and the content is then not hashed)
    stamped = [{**o, "meta": {"lastUpdated": "2025-01-01T00:00:00Z"}} for o in before]
    touched = copy.deepcopy(stamped)
    touched[0]["meta"]["lastUpdated"] = "2025-01-02T00:00:00Z"
    assert key_for(kg, touched) != key_for(kg, stamped)


def test_version_id_keeps_the_key_it_always_had() -> None:
    kg = load_graph(None)
    versioned = [{**a1c(PID, 7.4, 30, "o1"), "meta": {"versionId": "3",
                                                      "lastUpdated": "2025-01-01T00:00:00Z"}}]
    assert key_for(kg, versioned) == report_key(PID, [InputRef("Observation/o1", "3")],
                                                PREDICTION)


def test_input_stamp_prefers_version_id_then_last_updated_then_content() -> None:
    obs = a1c(PID, 7.4, 30, "o1")
    assert input_stamp({**obs, "meta": {"versionId": "2", "lastUpdated": "x"}}) == "2"
    assert input_stamp({**obs, "meta": {"lastUpdated": "2025-01-01T00:00:00Z"}}) == \
        "lastUpdated:2025-01-01T00:00:00Z"
    content = input_stamp(obs)
    assert content.startswith("sha256:") and content == input_stamp(dict(reversed(obs.items())))
    assert content != input_stamp({**obs, "status": "amended"})
    assert input_stamp({**obs, "meta": "not an object"}).startswith("sha256:")

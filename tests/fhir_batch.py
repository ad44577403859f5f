"""Batch Bundles for the tests' fake FHIR servers (httpx.MockTransport handlers).

The worker reads a patient in one `batch` Bundle of GETs (`FhirClient.batch`). A fake written
for one request per read answers it through `batching(handler)`: each entry is handed to the
same handler as the GET it stands for, and the answers are put together as a server answers a
batch (`batch-response`, one entry per request with its status). Anything else goes to the
handler as it came.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from http import HTTPStatus

import httpx

Handler = Callable[[httpx.Request], httpx.Response]


def is_batch(request: httpx.Request) -> bool:
    if request.method != "POST" or request.url.path.rstrip("/").split("/")[-1] not in (
            "fhir", ""):
        return False
    try:
        return bool(json.loads(request.content).get("type") == "batch")
    except (ValueError, AttributeError):
        return False


def batching(handler: Handler) -> Handler:
    """`handler`, answering batch Bundles of GETs entry by entry."""
    def answer(request: httpx.Request) -> httpx.Response:
        if not is_batch(request):
            return handler(request)
        base = str(request.url).rstrip("/")
        out = []
        for entry in json.loads(request.content)["entry"]:
            url = entry["request"]["url"]
            got = handler(httpx.Request("GET", f"{base}/{url}", headers=request.headers))
            got.read()
            try:
                body = got.json()
            except ValueError:
                body = None
            status = f"{got.status_code} {HTTPStatus(got.status_code).phrase}"
            item: dict[str, object] = {"response": {"status": status}}
            if body is not None:
                item["resource"] = body
            out.append(item)
        body = {"resourceType": "Bundle", "type": "batch-response", "entry": out}
        # as the entries came (a lax server's NaN and Infinity too: httpx's json= refuses them)
        return httpx.Response(200, content=json.dumps(body).encode(),
                              headers={"Content-Type": "application/fhir+json"})
    return answer

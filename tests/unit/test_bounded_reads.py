"""Bounded reads (issue 13, item 2): one server answer cannot take a worker down.

httpx.MockTransport only. A gzip bomb ends in a final error without being inflated, a `next`
cycle is caught at the repeat, an endless search stops at the configured page limit, and a
huge set of notes is cut to the newest with a recorded skip for each older one.
"""

from __future__ import annotations

import base64
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from clinragen_fhir.config import FhirEndpoint, ReportSettings
from clinragen_fhir.encoding import notes as notes_mod
from clinragen_fhir.encoding.notes import extract_notes
from clinragen_fhir.fhir.bodies import MAX_RESPONSE_BYTES
from clinragen_fhir.fhir.client import MAX_PAGES, FhirClient
from clinragen_fhir.fhir.errors import FhirError, FhirTooLarge
from clinragen_fhir.knowledge import load_graph
from clinragen_fhir.pipeline import gather_inputs
from tests.fhir_batch import batching

BASE = "http://127.0.0.1:8080/fhir"
MIB = 1024 * 1024
Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, **settings: Any) -> FhirClient:
    """A client built from the settings, as the worker builds it."""
    endpoint = FhirEndpoint(base_url=BASE, retries=2, **settings)
    return endpoint.client(transport=httpx.MockTransport(batching(handler)))


def gzip_bomb(inflated: int) -> bytes:
    """`inflated` zero bytes gzipped, built a MiB at a time (never held inflated here)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = bytes(MIB)
    body = b"".join(packer.compress(zeros) for _ in range(inflated // MIB))
    return body + packer.flush()


def streamed(body: bytes, **headers: str) -> httpx.Response:
    """An answer as a network transport gives it: a stream not yet read (`content=` would be
    read, and inflated, by httpx in the handler itself)."""
    return httpx.Response(200, headers={"Content-Type": "application/fhir+json", **headers},
                          stream=httpx.ByteStream(body))


def page(n: int, next_url: str | None, pad: int = 0) -> dict[str, Any]:
    links = [{"relation": "next", "url": next_url}] if next_url else []
    return {"resourceType": "Bundle", "type": "searchset", "link": links,
            "entry": [{"resource": {"resourceType": "Observation", "id": f"o{n}",
                                    "note": [{"text": "x" * pad}]}}]}


def test_gzip_bomb_is_a_final_error_without_inflating_it() -> None:
    inflated = 300 * MIB
    bomb = gzip_bomb(inflated)
    assert len(bomb) < MIB  # the review's bomb: 0.29 MiB on the wire
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        assert request.headers["Accept-Encoding"] == "gzip, deflate"
        return streamed(bomb, **{"Content-Encoding": "gzip"})

    for fhir, cap in ((client(handler), MAX_RESPONSE_BYTES),
                      (client(handler, max_response_bytes=4 * MIB), 4 * MIB)):
        calls.clear()
        tracemalloc.start()
        try:
            with fhir, pytest.raises(FhirTooLarge, match="max_response_bytes") as info:
                fhir.read("Patient", "p1")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert not info.value.retryable and len(calls) == 1  # final: a retry inflates it again
        assert "p1" not in str(info.value)
        assert peak < cap + 8 * MIB < inflated / 4, f"peak {peak / MIB:.0f} MiB"


def test_wire_cap_counts_compressed_bytes() -> None:
    """A body that compresses badly is stopped by the bytes on the wire, declared or not."""
    noise = zlib.compress(bytes(range(256)) * 4096, 0)  # stored blocks: wire >= inflated

    def chunked(request: httpx.Request) -> httpx.Response:
        return streamed(noise, **{"Content-Encoding": "deflate"})

    def declared(request: httpx.Request) -> httpx.Response:
        return streamed(b"{}", **{"Content-Length": str(10 * MIB)})

    for handler in (chunked, declared):
        with client(handler, max_wire_bytes=MIB // 2) as fhir, \
                pytest.raises(FhirTooLarge, match="max_wire_bytes"):
            fhir.read("Patient", "p1")


def test_next_link_cycle_stops_at_the_repeat() -> None:
    """Page 2 links back to page 1 (query reordered, host in capitals): the second request is
    the last; the old client fetched the same two pages until 10,000 requests."""
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        if "_getpages" not in str(request.url):
            return httpx.Response(200, json=page(1, f"{BASE}?_getpages=s&_getpagesoffset=1"))
        back = "http://127.0.0.1:8080/fhir?_getpagesoffset=1&_getpages=s"
        return httpx.Response(200, json=page(2, back))

    with client(handler) as fhir, pytest.raises(FhirError, match="paging cycle") as info:
        list(fhir.search("Observation", {"patient": "p1"}))
    assert len(calls) == 2 and not info.value.retryable

    first: list[str] = []

    def to_first(request: httpx.Request) -> httpx.Response:  # next is the first page itself
        first.append(str(request.url))
        return httpx.Response(200, json=page(1, f"{BASE}/Observation?patient=p1&_count=200"))

    with client(to_first) as fhir, pytest.raises(FhirError, match="paging cycle"):
        list(fhir.search("Observation", {"patient": "p1"}))
    assert len(first) == 1


def endless(calls: list[int], pages: int = 10_000, pad: int = 0) -> Handler:
    """A search of `pages` distinct pages, one resource each."""
    def handler(request: httpx.Request) -> httpx.Response:
        n = int(request.url.params.get("_getpagesoffset", "0"))
        calls.append(n)
        more = f"{BASE}?_getpages=s&_getpagesoffset={n + 1}" if n + 1 < pages else None
        return httpx.Response(200, json=page(n, more, pad))
    return handler


def test_10000_page_search_stops_at_the_page_limit() -> None:
    calls: list[int] = []
    with client(endless(calls), max_pages=25) as fhir, \
            pytest.raises(FhirTooLarge, match="more than 25 pages") as info:
        list(fhir.search("Observation", {"patient": "p1"}))
    assert len(calls) == 25 and not info.value.retryable

    calls.clear()  # the default stops well before the old 10,000
    with client(endless(calls)) as fhir, pytest.raises(FhirTooLarge, match="max_pages"):
        list(fhir.search("Observation", {"patient": "p1"}))
    assert len(calls) == MAX_PAGES < 10_000


def test_search_byte_budget_and_page_by_page_streaming() -> None:
    """Pages reach the consumer one at a time: a search stops at its byte budget in all, and
    a consumer that stops early asks for no further page."""
    calls: list[int] = []
    with client(endless(calls, pad=100_000), max_search_bytes=MIB) as fhir, \
            pytest.raises(FhirTooLarge, match="max_search_bytes"):
        for _ in fhir.search("Observation", {"patient": "p1"}):
            pass
    assert len(calls) == 11  # 11 pages of 100 kB pass 1 MiB

    calls.clear()
    with client(endless(calls)) as fhir:
        taken = [r["id"] for _, r in zip(range(3), fhir.search("Observation", {}), strict=False)]
    assert taken == ["o0", "o1", "o2"] and len(calls) == 3


def docref(n: int, chars: int, when: datetime) -> dict[str, Any]:
    text = (f"note {n} " + "x" * chars)[:chars].encode()
    return {"resourceType": "DocumentReference", "id": f"d{n}", "status": "current",
            "date": when.isoformat(),
            "content": [{"attachment": {"contentType": "text/plain",
                                        "data": base64.b64encode(text).decode()}}]}


def test_huge_notes_set_is_bounded_newest_first() -> None:
    """3,000 notes of 40,000 characters (120 M in all), as a stream: the newest are kept up to
    the total bound, each older one is a recorded skip, and the stream is never held whole."""
    now = datetime(2025, 6, 1, tzinfo=UTC)

    def documents() -> Iterator[dict[str, Any]]:
        for n in range(3_000):  # oldest first, as a server without _sort may answer
            yield docref(n, 40_000, now - timedelta(days=3_000 - n))

    tracemalloc.start()
    try:
        notes, skips = extract_notes(documents())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    budget = notes_mod.MAX_NOTES_TOTAL_CHARS
    assert sum(len(n.text) for n in notes) <= budget
    assert len(notes) == budget // 40_000 and notes[-1].document_id == "DocumentReference/d2999"
    assert len(skips) == 3_000 - len(notes)
    assert {s.reason for s in skips} == {
        f"older than the newest notes within {budget} characters in all"}
    assert max(n.time for n in notes if n.time) == now - timedelta(days=1)
    assert peak < 10 * budget < 120_000_000 / 4, f"peak {peak / MIB:.0f} MiB"

    # the lookback window applies to notes as to labs: an old note is a skip with its reason
    old, recent = docref(1, 100, now - timedelta(days=4_000)), docref(2, 100, now)
    notes, skips = extract_notes([old, recent], since=now - timedelta(days=3 * 365))
    assert [n.document_id for n in notes] == ["DocumentReference/d2"]
    assert skips[0].reference == "DocumentReference/d1" and "lookback" in skips[0].reason


def test_worker_path_bounds_notes() -> None:
    """gather_inputs, the worker's read path: a patient with 300 long notes gets the newest
    within the bound, and every other one is listed among the skipped inputs."""
    now = datetime(2025, 6, 1, tzinfo=UTC)
    docs = [docref(n, 20_000, now - timedelta(days=300 - n)) for n in range(300)]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/Patient/p1"):
            return httpx.Response(200, json={"resourceType": "Patient", "id": "p1"})
        entries = docs if request.url.path.endswith("/DocumentReference") else []
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset",
                                         "entry": [{"resource": d} for d in entries]})

    with client(handler) as fhir:
        inputs = gather_inputs(fhir, load_graph(None), "p1", ReportSettings(), now)
    kept = {n.document_id for n in inputs.notes}
    assert sum(len(n.text) for n in inputs.notes) <= notes_mod.MAX_NOTES_TOTAL_CHARS
    assert kept == {f"DocumentReference/d{n}" for n in range(250, 300)}
    assert {s.reference for s in inputs.skips} == {f"DocumentReference/d{n}"
                                                    for n in range(250)}

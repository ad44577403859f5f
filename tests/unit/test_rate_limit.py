"""Per-endpoint rate limit: a token bucket in the FHIR client, set per endpoint in the config."""

from __future__ import annotations

import itertools
import threading
import time

import httpx
import pytest

from clinragen_fhir.config import FhirEndpoint
from clinragen_fhir.fhir.client import FhirClient, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_bucket_allows_a_burst_then_paces_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(4.0, burst=2, clock=clock, sleep=clock.sleep)
    waits = [bucket.acquire() for _ in range(6)]
    assert waits[:2] == [0.0, 0.0]  # the burst
    assert waits[2:] == pytest.approx([0.25] * 4)  # then one every 1/rate s
    assert clock.now == pytest.approx(1.0)
    clock.now += 10  # idle time refills up to the burst, not beyond
    assert [bucket.acquire() for _ in range(3)] == pytest.approx([0.0, 0.0, 0.25])


def test_bucket_rejects_a_zero_rate() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_client_requests_are_paced_across_threads() -> None:
    calls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        return httpx.Response(200, json={"resourceType": "Patient", "id": "x"})

    client = FhirClient("http://127.0.0.1:9/fhir", transport=httpx.MockTransport(handler),
                        rate_limit=20.0, rate_burst=1)
    started = time.monotonic()
    threads = [threading.Thread(target=lambda: [client.read("Patient", "x") for _ in range(3)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    assert len(calls) == 12
    assert elapsed >= 11 / 20 - 0.02  # 12 requests at 20/s with a burst of 1
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert min(gaps) > 0.02  # never two at once


def test_rate_limit_is_configured_per_endpoint() -> None:
    unlimited = FhirEndpoint().client()
    assert unlimited.bucket is None
    limited = FhirEndpoint(rate_limit_per_s=5, rate_limit_burst=3).client()
    assert limited.bucket is not None
    assert (limited.bucket.rate, limited.bucket.capacity) == (5, 3)
    unlimited.close()
    limited.close()

"""Real services for integration tests: HAPI FHIR (deploy/hapi), Redis, a Celery worker process.

`make test` starts HAPI and Redis first; a test that finds them down fails (it does not skip).
The worker is a real `clinragen-fhir worker` subprocess on its own Redis databases.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from clinragen_fhir.fhir.client import FhirClient
from clinragen_fhir.fhir.loader import load

ROOT = Path(__file__).resolve().parents[2]
FHIR_URL = os.environ.get("CLINRAGEN_TEST_FHIR", "http://127.0.0.1:8080/fhir")
BROKER = os.environ.get("CLINRAGEN_TEST_BROKER", "redis://127.0.0.1:6379/2")
BACKEND = os.environ.get("CLINRAGEN_TEST_BACKEND", "redis://127.0.0.1:6379/3")
# The test process enqueues through the same app the worker runs: point both at the test dbs.
os.environ.update({"CLINRAGEN_FHIR__BASE_URL": FHIR_URL, "CLINRAGEN_BROKER_URL": BROKER,
                   "CLINRAGEN_RESULT_BACKEND": BACKEND})


def worker_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


@pytest.fixture(scope="session")
def fhir() -> Iterator[FhirClient]:
    try:
        httpx.get(f"{FHIR_URL}/metadata", timeout=30).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.fail(f"HAPI FHIR is not answering at {FHIR_URL} (run deploy/hapi/start): {exc}")
    with FhirClient(FHIR_URL, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def loaded(fhir: FhirClient, data_dir: Path, patient_bundles: list[Path]) -> list[str]:
    """The California support bundles and five patients with labs, loaded into HAPI."""
    support = sorted(data_dir.glob("california/*Information*.json.gz"))
    chosen = [p for p in patient_bundles if p.parent.name == "california"][:5]
    report = load(fhir, support + chosen, workers=2, progress=False)
    assert not report.errors, report.errors
    return [p.name.removesuffix(".json.gz") for p in chosen]


@pytest.fixture(scope="session")
def worker() -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker process (prefork, 2 children) on the test broker databases."""
    import redis

    for url in (BROKER, BACKEND):
        redis.Redis.from_url(url).flushdb()
    (ROOT / ".run").mkdir(exist_ok=True)
    log = open(ROOT / ".run" / "test-worker.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "clinragen_fhir.cli", "worker", "-n", "itest@%h",
         "--concurrency", "2"], env=worker_env(), stdout=log, stderr=subprocess.STDOUT)
    from clinragen_fhir.worker.app import app

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"worker exited: {(ROOT / '.run' / 'test-worker.log').read_text()[-2000:]}")
        if app.control.inspect(timeout=1).ping():
            break
    else:
        pytest.fail("worker did not answer a ping in 60 s")
    yield proc
    proc.terminate()
    proc.wait(30)
    log.close()
